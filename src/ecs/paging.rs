//! The one page loop every listing of [`super::EcsClient`] uses.
//!
//! ECS pages in three ways, each documented in the action's request model (legacy SDK
//! `aliyunsdkecs/request/v20140526/*Request.py`, current SDK
//! `alibabacloud_ecs20140526/models/_*_request.py`):
//! - [`Paging::Token`]: `MaxResults` + `NextToken`, follow `NextToken` until it is empty
//!   (`DescribeInstances`: "Maximum value: 100"; `DescribeInstanceTypes`: "Maximum value: 1600.
//!   Default value: 1600");
//! - [`Paging::Number`]: `PageSize` + `PageNumber` (1-based), stop when `TotalCount` items were
//!   seen or a page comes back short;
//! - [`Paging::Offset`]: `Offset`, follow `NextOffset` while it grows
//!   (`DescribeSpotPriceHistory`).
//!
//! Every loop stops after [`MAX_PAGES`] pages, and when ECS repeats a token or an offset, so a
//! misbehaving answer cannot loop for ever.

use serde_json::Value;

use super::error::EcsError;
use super::types::{opt_str, opt_u64};

/// Safety bound on pages followed in one listing.
pub const MAX_PAGES: usize = 1000;

/// How an action pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paging {
    /// `MaxResults` (this many per page) and `NextToken`.
    Token { max_results: usize },
    /// `PageSize` (this many per page) and `PageNumber`.
    Number { page_size: usize },
    /// `Offset` and `NextOffset`.
    Offset,
}

/// Calls `call` with `base` plus the paging parameters until the last page, handing each
/// answer to `page`, which returns how many items it held.
pub fn each_page(
    paging: Paging,
    base: &[(String, String)],
    mut call: impl FnMut(&[(String, String)]) -> Result<Value, EcsError>,
    mut page: impl FnMut(&Value) -> Result<usize, EcsError>,
) -> Result<(), EcsError> {
    let mut token: Option<String> = None;
    let mut offset: u64 = 0;
    let mut seen = 0usize;
    for number in 1..=MAX_PAGES {
        let mut params = base.to_vec();
        match paging {
            Paging::Token { max_results } => {
                params.push(("MaxResults".to_string(), max_results.to_string()));
                if let Some(t) = &token {
                    params.push(("NextToken".to_string(), t.clone()));
                }
            }
            Paging::Number { page_size } => {
                params.push(("PageSize".to_string(), page_size.to_string()));
                params.push(("PageNumber".to_string(), number.to_string()));
            }
            Paging::Offset => {
                if offset > 0 {
                    params.push(("Offset".to_string(), offset.to_string()));
                }
            }
        }
        let v = call(&params)?;
        let count = page(&v)?;
        seen += count;
        let more = match paging {
            Paging::Token { .. } => match opt_str(&v, "NextToken") {
                Some(next) if Some(&next) != token.as_ref() => {
                    token = Some(next);
                    true
                }
                _ => false,
            },
            Paging::Number { page_size } => {
                let total = opt_u64(&v, "TotalCount").map(|t| t as usize);
                count > 0 && total.map_or(count >= page_size, |t| seen < t)
            }
            Paging::Offset => match opt_u64(&v, "NextOffset") {
                Some(next) if count > 0 && next > offset => {
                    offset = next;
                    true
                }
                _ => false,
            },
        };
        if !more {
            return Ok(());
        }
    }
    log::warn!("stopped listing after {MAX_PAGES} pages");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(paging: Paging, answers: Vec<Value>) -> (Vec<Vec<(String, String)>>, usize) {
        let mut sent = Vec::new();
        let mut answers = answers.into_iter();
        let mut items = 0;
        each_page(
            paging,
            &[("A".to_string(), "1".to_string())],
            |p| {
                sent.push(p.to_vec());
                Ok(answers.next().expect("no more answers"))
            },
            |v| {
                let n = v["n"].as_u64().unwrap() as usize;
                items += n;
                Ok(n)
            },
        )
        .unwrap();
        (sent, items)
    }

    fn get<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
        p.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn token_paging_follows_next_token_and_stops_on_empty_or_repeated() {
        let (sent, items) = run(
            Paging::Token { max_results: 100 },
            vec![
                json!({"n": 100, "NextToken": "t1"}),
                json!({"n": 100, "NextToken": "t2"}),
                json!({"n": 5, "NextToken": ""}),
            ],
        );
        assert_eq!(items, 205);
        assert_eq!(
            sent.iter().map(|p| get(p, "NextToken")).collect::<Vec<_>>(),
            vec![None, Some("t1"), Some("t2")]
        );
        assert!(sent.iter().all(|p| get(p, "MaxResults") == Some("100") && get(p, "A") == Some("1")));
        let (sent, _) = run(
            Paging::Token { max_results: 10 },
            vec![json!({"n": 1, "NextToken": "x"}), json!({"n": 1, "NextToken": "x"})],
        );
        assert_eq!(sent.len(), 2, "a repeated token ends the loop");
    }

    #[test]
    fn number_paging_stops_at_the_total_or_a_short_page() {
        let (sent, items) = run(
            Paging::Number { page_size: 2 },
            vec![
                json!({"n": 2, "TotalCount": 5}),
                json!({"n": 2, "TotalCount": 5}),
                json!({"n": 1, "TotalCount": 5}),
            ],
        );
        assert_eq!((sent.len(), items), (3, 5));
        assert_eq!(get(&sent[2], "PageNumber"), Some("3"));
        assert_eq!(get(&sent[0], "PageSize"), Some("2"));
        let (sent, _) = run(Paging::Number { page_size: 2 }, vec![json!({"n": 2}), json!({"n": 1})]);
        assert_eq!(sent.len(), 2, "without TotalCount a short page is the last");
    }

    #[test]
    fn offset_paging_follows_a_growing_next_offset() {
        let (sent, items) = run(
            Paging::Offset,
            vec![
                json!({"n": 3, "NextOffset": 3}),
                json!({"n": 3, "NextOffset": 6}),
                json!({"n": 1, "NextOffset": 0}),
            ],
        );
        assert_eq!(items, 7);
        assert_eq!(
            sent.iter().map(|p| get(p, "Offset")).collect::<Vec<_>>(),
            vec![None, Some("3"), Some("6")]
        );
    }
}
