//! The key pairs' actions: ImportKeyPair, CreateKeyPair, DescribeKeyPairs, DeleteKeyPairs.

use serde_json::{json, Value};
use sha2::Digest;

use super::{check_dry_run, get, json_list, page, region_check, req};
use crate::emulator::api::{ApiError, ApiResult, Params};
use crate::emulator::instances::{lock, now, random_alnum, rfc3339, Core, KeyPair};

pub(super) fn key_fingerprint(public: &ssh_key::PublicKey) -> String {
    let blob = public.to_bytes().unwrap_or_default();
    let digest = sha2::Sha256::digest(&blob);
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

pub(super) fn validate_key_pair_name(name: &str) -> Result<(), ApiError> {
    let ok = (2..=128).contains(&name.len())
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid("InvalidKeyPairName.Malformed", "The specified KeyPairName is not valid."))
    }
}

pub(super) fn import_key_pair(core: &Core, p: &Params) -> ApiResult {
    region_check(core, p)?;
    let name = req(p, "KeyPairName")?;
    let body = req(p, "PublicKeyBody")?;
    validate_key_pair_name(name)?;
    let public = ssh_key::PublicKey::from_openssh(body.trim()).map_err(|_| {
        ApiError::invalid(
            "InvalidPublicKeyBody.Malformed",
            "The specified PublicKeyBody is not a valid public key.",
        )
    })?;
    let fp = key_fingerprint(&public);
    add_key_pair(core, name, body.trim().to_string(), fp.clone())?;
    Ok(json!({ "KeyPairName": name, "KeyPairFingerPrint": fp }))
}

/// Registers a key pair; a name already taken answers `KeyPair.AlreadyExist`.
pub(super) fn add_key_pair(
    core: &Core,
    name: &str,
    public_key: String,
    fingerprint: String,
) -> Result<(), ApiError> {
    let mut st = lock(&core.state);
    if st.key_pairs.contains_key(name) {
        return Err(ApiError::invalid(
            "KeyPair.AlreadyExist",
            &format!("The key pair \"{name}\" already exists."),
        ));
    }
    st.key_pairs.insert(
        name.to_string(),
        KeyPair { name: name.to_string(), public_key, fingerprint, created: now() },
    );
    Ok(())
}

pub(super) fn create_key_pair(core: &Core, p: &Params) -> ApiResult {
    region_check(core, p)?;
    let name = req(p, "KeyPairName")?;
    validate_key_pair_name(name)?;
    let key =
        ssh_key::PrivateKey::random(&mut rand::rngs::OsRng, ssh_key::Algorithm::Ed25519).map_err(|e| {
            ApiError::new(500, "InternalError", &format!("The request processing has failed: {e}"))
        })?;
    let private = key.to_openssh(ssh_key::LineEnding::LF).map_err(|e| {
        ApiError::new(500, "InternalError", &format!("The request processing has failed: {e}"))
    })?;
    let public = key.public_key().to_openssh().unwrap_or_default();
    let fp = key_fingerprint(key.public_key());
    add_key_pair(core, name, public, fp.clone())?;
    Ok(json!({
        "KeyPairName": name,
        "KeyPairFingerPrint": fp,
        "KeyPairId": format!("kp-bp1{}", random_alnum(15)),
        "PrivateKeyBody": private.as_str(),
    }))
}

pub(super) fn describe_key_pairs(core: &Core, p: &Params) -> ApiResult {
    region_check(core, p)?;
    check_dry_run(p)?;
    let name = get(p, "KeyPairName");
    let fp = get(p, "KeyPairFingerPrint");
    let (number, size) = page(p, 10, 50)?;
    let st = lock(&core.state);
    let all: Vec<Value> = st
        .key_pairs
        .values()
        .filter(|k| name.is_none_or(|n| crate::pattern::glob_match(n, &k.name)))
        .filter(|k| fp.is_none_or(|f| k.fingerprint == f))
        .map(|k| {
            json!({
                "KeyPairName": k.name,
                "KeyPairFingerPrint": k.fingerprint,
                "CreationTime": rfc3339(k.created),
                "ResourceGroupId": "",
                "Tags": { "Tag": [] },
            })
        })
        .collect();
    let total = all.len();
    let page: Vec<Value> = all.into_iter().skip((number - 1) * size).take(size).collect();
    Ok(
        json!({ "KeyPairs": { "KeyPair": page }, "TotalCount": total, "PageNumber": number, "PageSize": size }),
    )
}

pub(super) fn delete_key_pairs(core: &Core, p: &Params) -> ApiResult {
    region_check(core, p)?;
    let names = json_list(p, "KeyPairNames")?.ok_or_else(|| ApiError::missing("KeyPairNames"))?;
    check_dry_run(p)?;
    let mut st = lock(&core.state);
    for n in names {
        st.key_pairs.remove(&n);
    }
    Ok(json!({}))
}
