//! Fuzz target for connection strings: parsing arbitrary text never panics; a string that
//! parses prints (`Display`) to a string that parses to the same value and prints the same;
//! `Debug` does not depend on the key or signature; signing gives a token for
//! `sas_resource_uri` that verifies under the string's key.

#![no_main]

use libfuzzer_sys::fuzz_target;
use twinhub_proto::sas::{SasError, SasToken};
use twinhub_proto::{ConnectionString, ConnectionStringKind};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cs = match text.parse::<ConnectionString>() {
        Ok(cs) => cs,
        Err(error) => return assert!(error.to_string().len() < 200, "{error}"),
    };
    let printed = cs.to_string();
    let reparsed = printed.parse::<ConnectionString>();
    assert_eq!(reparsed.as_ref(), Ok(&cs), "{text:?} printed as {printed:?}");
    assert_eq!(reparsed.map(|c| c.to_string()), Ok(printed.clone()));

    assert!(!cs.host_name.is_empty());
    assert_eq!(
        cs.dial_host(),
        cs.gateway_host_name.as_deref().unwrap_or(&cs.host_name)
    );
    match cs.kind() {
        ConnectionStringKind::Service => assert!(cs.shared_access_key_name.is_some()),
        ConnectionStringKind::Device => assert!(cs.module_id.is_none()),
        ConnectionStringKind::Module => assert!(cs.device_id.is_some()),
    }

    // Debug output does not depend on the secrets.
    let mut masked = cs.clone();
    masked.shared_access_key = cs.shared_access_key.as_ref().map(|_| "x".into());
    masked.shared_access_signature = cs.shared_access_signature.as_ref().map(|_| "x".into());
    assert_eq!(format!("{cs:?}"), format!("{masked:?}"));

    match cs.generate_sas_token(1_000_000) {
        Ok(token) => {
            let parsed = SasToken::parse(&token).unwrap_or_else(|e| panic!("{token:?}: {e}"));
            assert_eq!(parsed.resource, cs.sas_resource_uri());
            assert_eq!(parsed.expiry, 1_000_000);
            let key_name = match cs.kind() {
                ConnectionStringKind::Service => cs.shared_access_key_name.as_deref(),
                _ => None,
            };
            assert_eq!(parsed.key_name.as_deref(), key_name);
            assert!(parsed.verify(cs.shared_access_key.as_deref().unwrap_or_default()));
        }
        Err(SasError::NoKey) => assert!(cs.shared_access_key.is_none()),
        Err(SasError::InvalidKey) => assert!(cs.shared_access_key.is_some()),
        Err(other) => panic!("{printed:?} fails to sign: {other}"),
    }
});
