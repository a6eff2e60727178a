//! Authorization decisions: shared access policies and their rights, service SAS tokens on
//! REST calls, and device SAS tokens on MQTT CONNECT. Token parsing and HMAC checks are in
//! `twinhub_proto::sas`; this module decides what a valid token may do.

use serde::{Deserialize, Serialize};
use twinhub_proto::sas::SasToken;

use crate::error::{Error, Result};
use crate::keys;

/// A right a shared access policy can grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Right {
    RegistryRead,
    RegistryWrite,
    ServiceConnect,
    DeviceConnect,
}

/// A shared access policy: a name, two keys, and rights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub name: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub rights: Vec<Right>,
}

impl Policy {
    pub fn grants(&self, right: Right) -> bool {
        // RegistryWrite implies RegistryRead, as in IoT Hub.
        self.rights.contains(&right)
            || (right == Right::RegistryRead && self.rights.contains(&Right::RegistryWrite))
    }
}

/// The hub's built-in policies, with fresh random keys.
pub fn default_policies() -> Vec<Policy> {
    use Right::*;
    let make = |name: &str, rights: &[Right]| Policy {
        name: name.to_string(),
        primary_key: keys::generate_key(),
        secondary_key: keys::generate_key(),
        rights: rights.to_vec(),
    };
    vec![
        make(
            "iothubowner",
            &[RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect],
        ),
        make("service", &[ServiceConnect]),
        make("registryRead", &[RegistryRead]),
        make("registryReadWrite", &[RegistryRead, RegistryWrite]),
        make("device", &[DeviceConnect]),
    ]
}

/// Checks tokens against the hub's name and policies.
#[derive(Debug, Clone)]
pub struct Authorizer {
    hostname: String,
    policies: Vec<Policy>,
    /// The furthest ahead a token's expiry may lie, in seconds.
    max_lifetime: u64,
}

impl Authorizer {
    pub fn new(hostname: impl Into<String>, policies: Vec<Policy>) -> Self {
        Authorizer {
            hostname: hostname.into(),
            policies,
            max_lifetime: crate::hub::DEFAULT_MAX_TOKEN_LIFETIME.as_secs(),
        }
    }

    /// Refuses tokens whose expiry lies further ahead than `max`: a leaked key must not buy
    /// a credential that outlives every rotation.
    pub fn with_max_token_lifetime(mut self, max: std::time::Duration) -> Self {
        self.max_lifetime = max.as_secs();
        self
    }

    /// The policy a service token names in `skn`.
    fn token_policy(&self, token: &SasToken) -> Result<&Policy> {
        let name = token
            .key_name
            .as_deref()
            .ok_or_else(|| Error::unauthorized("The token names no shared access policy (skn)"))?;
        self.policy(name).ok_or_else(|| {
            Error::unauthorized(format!(
                "Unknown shared access policy {}",
                crate::logsafe::Shown(name)
            ))
        })
    }

    fn check_lifetime(&self, token: &SasToken, now_unix: u64) -> Result<()> {
        if token.expiry.saturating_sub(now_unix) > self.max_lifetime {
            return Err(Error::unauthorized(format!(
                "The token expires more than {} seconds from now, longer than this hub allows",
                self.max_lifetime
            )));
        }
        Ok(())
    }

    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.name == name)
    }

    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// Authorizes a service call from its `Authorization` header value. Returns the policy.
    pub fn authorize_service(
        &self,
        header: Option<&str>,
        right: Right,
        now_unix: u64,
    ) -> Result<&Policy> {
        let header = header.ok_or_else(|| Error::unauthorized("Missing Authorization header"))?;
        let token = SasToken::parse(header)
            .map_err(|e| Error::unauthorized(format!("Malformed SharedAccessSignature: {e}")))?;
        let policy = self.token_policy(&token)?;
        let name = policy.name.as_str();
        if !self.hub_resource_matches(&token.resource) {
            return Err(Error::unauthorized(format!(
                "The token's resource {} does not name this hub",
                crate::logsafe::Shown(&token.resource)
            )));
        }
        if !(token.verify(&policy.primary_key) || token.verify(&policy.secondary_key)) {
            return Err(Error::unauthorized("The token's signature is invalid"));
        }
        if token.is_expired(now_unix) {
            return Err(Error::unauthorized("The token has expired"));
        }
        self.check_lifetime(&token, now_unix)?;
        if !policy.grants(right) {
            return Err(Error::unauthorized(format!(
                "Policy '{name}' does not grant {right:?}"
            )));
        }
        Ok(policy)
    }

    /// `sr` names this hub: the host name, with or without a port, case-insensitively.
    fn hub_resource_matches(&self, resource: &str) -> bool {
        let host = resource.trim_end_matches('/');
        host_matches(host, &self.hostname)
    }

    /// Authenticates an identity's CONNECT password against its keys (or a policy with
    /// DeviceConnect). `key` is a device id or `deviceId/moduleId`: the token's resource must
    /// name exactly that identity (`{host}/devices/{d}` or `{host}/devices/{d}/modules/{m}`),
    /// so a device's token never stands for its modules nor a module's for its device.
    /// Returns the token's expiry (unix seconds).
    pub fn authenticate_device(
        &self,
        key: &str,
        primary_key: Option<&str>,
        secondary_key: Option<&str>,
        password: &str,
        now_unix: u64,
    ) -> Result<u64> {
        let token = SasToken::parse(password)
            .map_err(|e| Error::unauthorized(format!("Malformed SharedAccessSignature: {e}")))?;
        let Some((host, path)) = token.resource.split_once('/') else {
            return Err(Error::unauthorized("The token's resource names no device"));
        };
        let expected = match crate::record::split_identity(key) {
            (device, Some(module)) => format!("devices/{device}/modules/{module}"),
            (device, None) => format!("devices/{device}"),
        };
        if !host_matches(host, &self.hostname) || path.trim_end_matches('/') != expected {
            return Err(Error::unauthorized(format!(
                "The token's resource {} does not name '{expected}' on this hub",
                crate::logsafe::Shown(&token.resource)
            )));
        }
        let valid = match token.key_name.as_deref() {
            None => [primary_key, secondary_key]
                .into_iter()
                .flatten()
                .any(|k| token.verify(k)),
            Some(name) => self.policy(name).is_some_and(|p| {
                p.grants(Right::DeviceConnect)
                    && (token.verify(&p.primary_key) || token.verify(&p.secondary_key))
            }),
        };
        if !valid {
            return Err(Error::unauthorized("The token's signature is invalid"));
        }
        if token.is_expired(now_unix) {
            return Err(Error::unauthorized("The token has expired"));
        }
        self.check_lifetime(&token, now_unix)?;
        Ok(token.expiry)
    }
}

/// What an AMQP client proved through CBS or SASL PLAIN: a policy's rights until `expiry`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpGrant {
    pub policy: String,
    pub rights: Vec<Right>,
    /// Unix seconds; `u64::MAX` for a raw policy key given over SASL PLAIN.
    pub expiry: u64,
}

impl AmqpGrant {
    pub fn allows(&self, right: Right, now_unix: u64) -> bool {
        now_unix < self.expiry
            && (self.rights.contains(&right)
                || (right == Right::RegistryRead && self.rights.contains(&Right::RegistryWrite)))
    }
}

impl Authorizer {
    /// Checks a SAS token presented on the AMQP endpoint (CBS put-token or SASL PLAIN).
    /// Its resource must name this hub, with any scheme and any path beneath it
    /// (`sb://host/eh/consumergroups/cg`, `host/messages/events`, `host`); it may be signed
    /// the IoT Hub way or the Event Hubs way (the key's text as the HMAC key).
    pub fn authorize_amqp_token(&self, token: &str, now_unix: u64) -> Result<AmqpGrant> {
        let token = SasToken::parse(token)
            .map_err(|e| Error::unauthorized(format!("Malformed SharedAccessSignature: {e}")))?;
        let resource = token.resource.as_str();
        let without_scheme = match resource.find("://") {
            Some(i) => &resource[i + 3..],
            None => resource,
        };
        let host = without_scheme.split('/').next().unwrap_or("");
        if !host_matches(host, &self.hostname) {
            return Err(Error::unauthorized(format!(
                "The token's resource {} does not name this hub",
                crate::logsafe::Shown(resource)
            )));
        }
        let policy = self.token_policy(&token)?;
        let signed = [&policy.primary_key, &policy.secondary_key]
            .into_iter()
            .any(|key| token.verify(key) || token.verify_with_key_text(key));
        if !signed {
            return Err(Error::unauthorized("The token's signature is invalid"));
        }
        if token.is_expired(now_unix) {
            return Err(Error::unauthorized("The token has expired"));
        }
        self.check_lifetime(&token, now_unix)?;
        Ok(AmqpGrant {
            policy: policy.name.clone(),
            rights: policy.rights.clone(),
            expiry: token.expiry,
        })
    }

    /// SASL PLAIN: `<policy>@sas.root.<hub>` with a SAS token, or `<policy>` with the
    /// policy's key itself (the Event Hubs form).
    pub fn authorize_amqp_plain(
        &self,
        username: &str,
        password: &str,
        now_unix: u64,
    ) -> Result<AmqpGrant> {
        if password.starts_with("SharedAccessSignature ") {
            let grant = self.authorize_amqp_token(password, now_unix)?;
            let named = username.split('@').next().unwrap_or(username);
            if named != grant.policy {
                return Err(Error::unauthorized(format!(
                    "The user name {} does not match the token's policy",
                    crate::logsafe::Shown(username)
                )));
            }
            return Ok(grant);
        }
        let policy = self.policy(username).ok_or_else(|| {
            Error::unauthorized(format!(
                "Unknown shared access policy {}",
                crate::logsafe::Shown(username)
            ))
        })?;
        let matches = |key: &str| {
            use sha2::Digest;
            // Compare digests so the time taken says nothing about the key.
            sha2::Sha256::digest(key.as_bytes()) == sha2::Sha256::digest(password.as_bytes())
        };
        if !(matches(&policy.primary_key) || matches(&policy.secondary_key)) {
            return Err(Error::unauthorized("The key does not match the policy"));
        }
        Ok(AmqpGrant {
            policy: policy.name.clone(),
            rights: policy.rights.clone(),
            expiry: u64::MAX,
        })
    }
}

/// `candidate` (possibly `host:port`) names `hostname`.
fn host_matches(candidate: &str, hostname: &str) -> bool {
    if candidate.eq_ignore_ascii_case(hostname) {
        return true;
    }
    match candidate.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            h.eq_ignore_ascii_case(hostname)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinhub_proto::sas::generate_sas_token;

    fn authorizer() -> Authorizer {
        Authorizer::new("hub.local", default_policies())
    }

    fn service_token(a: &Authorizer, policy: &str, sr: &str, expiry: u64) -> String {
        let key = &a.policy(policy).unwrap().primary_key;
        generate_sas_token(sr, key, Some(policy), expiry).unwrap()
    }

    #[test]
    fn amqp_tokens_in_both_signing_schemes() {
        let a = authorizer();
        let now = 1_000_000;
        let key = a.policy("service").unwrap().primary_key.clone();
        let iothub =
            generate_sas_token("hub.local/messages/events", &key, Some("service"), now + 60)
                .unwrap();
        let grant = a.authorize_amqp_token(&iothub, now).unwrap();
        assert!(grant.allows(Right::ServiceConnect, now));
        assert!(!grant.allows(Right::ServiceConnect, now + 60));
        assert!(!grant.allows(Right::RegistryRead, now));

        // The Event Hubs scheme: quote_plus(audience) signed with the key's text.
        let audience = "sb%3A%2F%2Fhub.local%2Fhub%2Fconsumergroups%2F%24default";
        let sig = {
            use hmac::{KeyInit, Mac};
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
            mac.update(format!("{audience}\n{}", now + 60).as_bytes());
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        };
        let sig = twinhub_proto::encoding::quote(&sig).into_owned();
        let eh = format!(
            "SharedAccessSignature sr={audience}&sig={sig}&se={}&skn=service",
            now + 60
        );
        assert!(a.authorize_amqp_token(&eh, now).is_ok());
        assert!(
            a.authorize_amqp_token(&eh.replace("skn=service", "skn=iothubowner"), now)
                .is_err()
        );
        let elsewhere = generate_sas_token("other.local", &key, Some("service"), now + 60).unwrap();
        assert!(a.authorize_amqp_token(&elsewhere, now).is_err());
        let no_policy = generate_sas_token("hub.local", &key, None, now + 60).unwrap();
        assert!(a.authorize_amqp_token(&no_policy, now).is_err());
    }

    #[test]
    fn amqp_plain_with_a_token_or_the_key() {
        let a = authorizer();
        let now = 1_000_000;
        let key = a.policy("service").unwrap().primary_key.clone();
        assert!(a.authorize_amqp_plain("service", &key, now).is_ok());
        assert!(a.authorize_amqp_plain("service", "nope", now).is_err());
        assert!(a.authorize_amqp_plain("iothubowner", &key, now).is_err());
        let token = generate_sas_token("hub.local", &key, Some("service"), now + 60).unwrap();
        assert!(
            a.authorize_amqp_plain("service@sas.root.hub", &token, now)
                .is_ok()
        );
        assert!(
            a.authorize_amqp_plain("device@sas.root.hub", &token, now)
                .is_err()
        );
    }

    #[test]
    fn service_tokens() {
        let a = authorizer();
        let now = 1_000_000;
        let ok = service_token(&a, "iothubowner", "hub.local", now + 60);
        assert!(
            a.authorize_service(Some(&ok), Right::RegistryWrite, now)
                .is_ok()
        );
        let with_port = service_token(&a, "iothubowner", "hub.local:8443", now + 60);
        assert!(
            a.authorize_service(Some(&with_port), Right::ServiceConnect, now)
                .is_ok()
        );
        let expired = service_token(&a, "iothubowner", "hub.local", now - 1);
        assert!(
            a.authorize_service(Some(&expired), Right::RegistryRead, now)
                .is_err()
        );
        let other_hub = service_token(&a, "iothubowner", "other.local", now + 60);
        assert!(
            a.authorize_service(Some(&other_hub), Right::RegistryRead, now)
                .is_err()
        );
        let read_only = service_token(&a, "registryRead", "hub.local", now + 60);
        assert!(
            a.authorize_service(Some(&read_only), Right::RegistryRead, now)
                .is_ok()
        );
        assert!(
            a.authorize_service(Some(&read_only), Right::RegistryWrite, now)
                .is_err()
        );
        let rw = service_token(&a, "registryReadWrite", "hub.local", now + 60);
        assert!(
            a.authorize_service(Some(&rw), Right::RegistryRead, now)
                .is_ok()
        );
        assert!(
            a.authorize_service(Some(&rw), Right::ServiceConnect, now)
                .is_err()
        );
        assert!(a.authorize_service(None, Right::RegistryRead, now).is_err());
        let forged = generate_sas_token(
            "hub.local",
            &keys::generate_key(),
            Some("iothubowner"),
            now + 60,
        )
        .unwrap();
        assert!(
            a.authorize_service(Some(&forged), Right::RegistryRead, now)
                .is_err()
        );
    }

    #[test]
    fn device_tokens() {
        let a = authorizer();
        let now = 1_000_000;
        let key = keys::generate_key();
        let tok = generate_sas_token("hub.local/devices/d1", &key, None, now + 60).unwrap();
        assert_eq!(
            a.authenticate_device("d1", Some(&key), None, &tok, now)
                .unwrap(),
            now + 60
        );
        assert!(
            a.authenticate_device("d2", Some(&key), None, &tok, now)
                .is_err()
        );
        assert!(
            a.authenticate_device("d1", Some(&keys::generate_key()), None, &tok, now)
                .is_err()
        );
        assert!(
            a.authenticate_device("d1", None, Some(&key), &tok, now)
                .is_ok()
        );
        assert!(
            a.authenticate_device("d1", Some(&key), None, &tok, now + 61)
                .is_err()
        );
        let pol = a.policy("device").unwrap().primary_key.clone();
        let tok =
            generate_sas_token("hub.local/devices/d1", &pol, Some("device"), now + 60).unwrap();
        assert!(a.authenticate_device("d1", None, None, &tok, now).is_ok());
        let svc = a.policy("service").unwrap().primary_key.clone();
        let tok =
            generate_sas_token("hub.local/devices/d1", &svc, Some("service"), now + 60).unwrap();
        assert!(a.authenticate_device("d1", None, None, &tok, now).is_err());
    }

    #[test]
    fn tokens_living_past_the_maximum_are_refused() {
        let a = authorizer().with_max_token_lifetime(std::time::Duration::from_secs(3600));
        let now = 1_000_000;
        let key = keys::generate_key();
        let forever = generate_sas_token("hub.local/devices/d1", &key, None, u64::MAX).unwrap();
        let err = a
            .authenticate_device("d1", Some(&key), None, &forever, now)
            .unwrap_err();
        assert!(
            err.message().contains("longer than this hub allows"),
            "{err}"
        );
        let hour = generate_sas_token("hub.local/devices/d1", &key, None, now + 3600).unwrap();
        assert!(
            a.authenticate_device("d1", Some(&key), None, &hour, now)
                .is_ok()
        );
        let svc = service_token(&a, "iothubowner", "hub.local", now + 3601);
        assert!(
            a.authorize_service(Some(&svc), Right::RegistryRead, now)
                .is_err()
        );
    }
}
