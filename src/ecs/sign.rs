//! Signature v1 (HMAC-SHA1) of ECS RPC requests, and where each parameter travels, as pure
//! functions.
//!
//! Why pure: the same code signs the client's requests and verifies them in the emulator, and
//! it is checked byte for byte against vectors computed with Aliyun's own SDK
//! (`aliyun-python-sdk-core` 2.16.1, `auth/composer/rpc_signature_composer.py`), which live in
//! `tests/data/aliyun-rpc-sign-vectors.json` (its `source` field says how they were computed).
//!
//! The algorithm (Aliyun's "Request syntax and signature method V2 for RPC APIs",
//! <https://www.alibabacloud.com/help/en/sdk/product-overview/rpc-mechanism>): percent-encode
//! names and values per RFC 3986 (space is `%20`, `*` is `%2A`, `~` stays), sort by name, join
//! `k=v` with `&`, then sign `METHOD & encode("/") & encode(canonical)` with key `secret + "&"`.
//!
//! Where the parameters go, for a POST, as the legacy SDK sends it ([`SignedRpc`]):
//! `rpc_signature_composer.get_signed_url` puts the common parameters it adds (`Timestamp`,
//! `SignatureMethod`, `SignatureType`, `SignatureVersion`, `SignatureNonce`, `AccessKeyId`,
//! `Format`) together with `Version`, `Action` and `RegionId` (`request.py`,
//! `RpcRequest._get_sign_params`/`get_url`), the `SecurityToken` of STS credentials
//! (`auth/signers/sts_token_signer.py`: `add_query_param`) and finally the `Signature` into the
//! URL query; body parameters travel as an `application/x-www-form-urlencoded` form
//! (`client.py` `_make_http_response`: `urlencode(body_params)`), and the string to sign covers
//! the query parameters updated with the body ones (`sign_params.update(body_params)`).
//! The executor sends the action's own parameters in the form, so a 32 KB `UserData` never
//! lengthens the URL.

use std::collections::BTreeMap;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// RFC 3986 percent-encoding as Aliyun's signer does it: unreserved characters stay, every
/// other UTF-8 byte becomes `%XY` with upper-case hex.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => {
                out.push('%');
                out.push(char::from(b"0123456789ABCDEF"[(b >> 4) as usize]));
                out.push(char::from(b"0123456789ABCDEF"[(b & 0xf) as usize]));
            }
        }
    }
    out
}

/// The canonicalised query string: every parameter but `Signature`, sorted by name (byte
/// order), `encode(name)=encode(value)` joined with `&`.
pub fn canonical_query(params: &BTreeMap<String, String>) -> String {
    let mut pairs: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k.as_str() != "Signature")
        .map(|(k, v)| (percent_encode(k), percent_encode(v)))
        .collect();
    // BTreeMap already orders by raw name; the encoded names keep that order for the
    // characters Aliyun allows in names, but sort again so the rule holds whatever comes in.
    pairs.sort();
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// The string to sign: `METHOD&%2F&encode(canonical_query)`.
pub fn string_to_sign(method: &str, params: &BTreeMap<String, String>) -> String {
    format!(
        "{}&{}&{}",
        method.to_ascii_uppercase(),
        percent_encode("/"),
        percent_encode(&canonical_query(params))
    )
}

/// `base64(HMAC-SHA1(secret + "&", string_to_sign))`.
pub fn signature(access_key_secret: &str, string_to_sign: &str) -> String {
    let key = format!("{access_key_secret}&");
    let mut mac = Hmac::<Sha1>::new_from_slice(key.as_bytes()).expect("HMAC accepts any key length");
    mac.update(string_to_sign.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Signs `params` for `method`; returns the value of the `Signature` parameter.
pub fn sign(method: &str, params: &BTreeMap<String, String>, access_key_secret: &str) -> String {
    signature(access_key_secret, &string_to_sign(method, params))
}

/// The common parameters: the ones the legacy SDK sends in the URL query of an RPC request
/// (see the module documentation), `Signature` included.
pub const COMMON_PARAMETERS: [&str; 12] = [
    "AccessKeyId",
    "Action",
    "Format",
    "RegionId",
    "SecurityToken",
    "Signature",
    "SignatureMethod",
    "SignatureNonce",
    "SignatureType",
    "SignatureVersion",
    "Timestamp",
    "Version",
];

/// A signed RPC request split as the legacy SDK sends a POST: the common parameters and the
/// `Signature` in the URL query, every other parameter in the form body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRpc {
    /// The URL query's parameters, `Signature` included.
    pub query: BTreeMap<String, String>,
    /// The form body's parameters.
    pub body: BTreeMap<String, String>,
}

impl SignedRpc {
    /// The URL query, encoded as the SDK encodes it (`urlencode` with `%20`, `%2A` and `~`,
    /// i.e. [`percent_encode`]), without the leading `?`.
    pub fn query_string(&self) -> String {
        self.query
            .iter()
            .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    }

    /// The `application/x-www-form-urlencoded` body.
    pub fn form_body(&self) -> String {
        form_urlencoded::Serializer::new(String::new()).extend_pairs(&self.body).finish()
    }

    /// Everything the signature covers: the query's parameters updated with the body's, and the
    /// `Signature`.
    pub fn all(&self) -> BTreeMap<String, String> {
        let mut all = self.query.clone();
        all.extend(self.body.clone());
        all
    }
}

/// Splits `params` into query (the [`COMMON_PARAMETERS`]) and body (the rest), signs both
/// together for `method` and puts the `Signature` in the query.
pub fn sign_split(method: &str, params: &BTreeMap<String, String>, access_key_secret: &str) -> SignedRpc {
    let (mut query, body): (BTreeMap<_, _>, BTreeMap<_, _>) = params
        .iter()
        .filter(|(k, _)| k.as_str() != "Signature")
        .map(|(k, v)| (k.clone(), v.clone()))
        .partition(|(k, _)| COMMON_PARAMETERS.contains(&k.as_str()));
    let mut signed_over = query.clone();
    signed_over.extend(body.clone());
    query.insert("Signature".to_string(), sign(method, &signed_over, access_key_secret));
    SignedRpc { query, body }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Vectors {
        vectors: Vec<Vector>,
    }

    #[derive(serde::Deserialize)]
    struct Vector {
        name: String,
        method: String,
        access_key_secret: String,
        params: BTreeMap<String, String>,
        string_to_sign: String,
        signature: String,
    }

    /// Every vector computed with Aliyun's SDK reproduces byte for byte.
    #[test]
    fn golden_vectors_from_aliyun_sdk() {
        let data: Vectors =
            serde_json::from_str(include_str!("../../tests/data/aliyun-rpc-sign-vectors.json")).unwrap();
        assert_eq!(data.vectors.len(), 8, "all shared vectors are present");
        for v in &data.vectors {
            let sts = string_to_sign(&v.method, &v.params);
            assert_eq!(sts, v.string_to_sign, "string to sign of vector `{}`", v.name);
            assert_eq!(
                signature(&v.access_key_secret, &sts),
                v.signature,
                "signature of vector `{}`",
                v.name
            );
        }
    }

    #[test]
    fn encoding_rules() {
        assert_eq!(percent_encode("a b*c~d/e:f"), "a%20b%2Ac~d%2Fe%3Af");
        assert_eq!(percent_encode("构"), "%E6%9E%84");
        assert_eq!(percent_encode("+=%"), "%2B%3D%25");
    }

    #[test]
    fn signature_parameter_is_not_signed() {
        let mut p = BTreeMap::new();
        p.insert("Action".to_string(), "DescribeRegions".to_string());
        let a = string_to_sign("GET", &p);
        p.insert("Signature".to_string(), "x".to_string());
        assert_eq!(a, string_to_sign("GET", &p));
    }

    /// Common parameters in the query, the rest in the body, one signature over both: a
    /// signature over either part alone differs.
    #[test]
    fn split_request_signs_query_and_body_together() {
        let data: Vectors =
            serde_json::from_str(include_str!("../../tests/data/aliyun-rpc-sign-vectors.json")).unwrap();
        let v = data.vectors.iter().find(|v| v.name.starts_with("RunInstances")).unwrap();
        let signed = sign_split(&v.method, &v.params, &v.access_key_secret);
        assert_eq!(signed.query["Signature"], v.signature, "the SDK's signature over the same parameters");
        let query_names: Vec<&str> = signed.query.keys().map(String::as_str).collect();
        assert_eq!(
            query_names,
            [
                "AccessKeyId",
                "Action",
                "Format",
                "RegionId",
                "Signature",
                "SignatureMethod",
                "SignatureNonce",
                "SignatureVersion",
                "Timestamp",
                "Version"
            ]
        );
        assert!(signed.body.contains_key("UserData") && signed.body.contains_key("Tag.1.Key"));
        assert!(!signed.body.keys().any(|k| COMMON_PARAMETERS.contains(&k.as_str())));
        let mut unsigned = signed.all();
        unsigned.remove("Signature");
        assert_eq!(unsigned, v.params);
        let mut query_only = signed.query.clone();
        query_only.remove("Signature");
        assert_ne!(sign(&v.method, &query_only, &v.access_key_secret), v.signature);
        assert_ne!(sign(&v.method, &signed.body, &v.access_key_secret), v.signature);
        // Wire forms: the query as the SDK encodes it, the body as a form both decode back.
        assert!(signed.query_string().contains("Timestamp=2026-11-24T01%3A02%3A03Z"));
        let body: BTreeMap<String, String> =
            form_urlencoded::parse(signed.form_body().as_bytes()).into_owned().collect();
        assert_eq!(body, signed.body);
    }
}
