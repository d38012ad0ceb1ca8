//! The create-walk: try offers in order until one is created (see the module doc of
//! [`crate::selection`], "The create-walk").

use super::Offer;

/// What one create attempt reported to [`walk_offers`].
#[derive(Debug)]
pub enum Attempt<T, E = anyhow::Error> {
    /// The instance was created; the walk stops.
    Created(T),
    /// This offer cannot be used (stock-out, zone not on sale, above the cap…); the reason is
    /// short and stable, e.g. `out of stock (OperationDenied.NoStock)`, because the summary
    /// counts offers by it.
    NextOffer(String),
    /// Stop at once (authentication, permission, parameter errors…).
    Fatal(E),
}

/// How [`walk_offers`] ended.
#[derive(Debug)]
pub enum WalkResult<T, E = anyhow::Error> {
    /// An offer was created.
    Created {
        /// The offer that worked.
        offer: Offer,
        /// What the callback returned.
        value: T,
        /// Offers skipped before it, with their reasons.
        skipped: Vec<(Offer, String)>,
    },
    /// Every offer was skipped (or there were none).
    Exhausted {
        /// One line: `all 3 offers failed: 2 out of stock (…), 1 zone not on sale (…)`.
        summary: String,
        /// Every offer with its reason, in the order tried.
        skipped: Vec<(Offer, String)>,
    },
    /// An attempt failed in a way no other offer can fix.
    Fatal {
        /// The offer being tried.
        offer: Offer,
        /// The error.
        error: E,
        /// Offers skipped before it, with their reasons.
        skipped: Vec<(Offer, String)>,
    },
}

/// Tries `offers` in order with `try_create` until one is created or one fails fatally. Each
/// skipped offer is reported through `log` as one line for the job log:
/// `ecs.c7.2xlarge in cn-hangzhou-h: out of stock (OperationDenied.NoStock), trying the next
/// offer` (the last one says `no offers left` instead).
pub fn walk_offers<T, E>(
    offers: &[Offer],
    mut try_create: impl FnMut(&Offer) -> Attempt<T, E>,
    mut log: impl FnMut(&str),
) -> WalkResult<T, E> {
    let mut skipped: Vec<(Offer, String)> = Vec::new();
    for (i, offer) in offers.iter().enumerate() {
        match try_create(offer) {
            Attempt::Created(value) => return WalkResult::Created { offer: offer.clone(), value, skipped },
            Attempt::Fatal(error) => return WalkResult::Fatal { offer: offer.clone(), error, skipped },
            Attempt::NextOffer(reason) => {
                let next = if i + 1 < offers.len() { "trying the next offer" } else { "no offers left" };
                log(&format!("{} in {}: {reason}, {next}", offer.instance_type, offer.zone));
                skipped.push((offer.clone(), reason));
            }
        }
    }
    let summary = summarize(&skipped);
    WalkResult::Exhausted { summary, skipped }
}

fn summarize(skipped: &[(Offer, String)]) -> String {
    if skipped.is_empty() {
        return "no offers to try".to_string();
    }
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for (_, reason) in skipped {
        match counts.iter_mut().find(|(r, _)| *r == reason.as_str()) {
            Some((_, n)) => *n += 1,
            None => counts.push((reason.as_str(), 1)),
        }
    }
    if let [(_, reason)] = skipped {
        return format!("the only offer failed: {reason}");
    }
    let parts: Vec<String> = counts.iter().map(|(r, n)| format!("{n} {r}")).collect();
    format!("all {} offers failed: {}", skipped.len(), parts.join(", "))
}
