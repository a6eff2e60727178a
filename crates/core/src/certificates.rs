//! X.509 client authentication: checks a TLS client certificate chain against an identity's
//! registered thumbprints (`selfSigned`) or the hub's verified CAs (`certificateAuthority`).

use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::record::DeviceRecord;

impl Hub {
    /// Checks `chain` (DER, leaf first) for `rec`; returns the leaf's notAfter (unix seconds).
    pub(crate) fn verify_client_certificate(
        &self,
        rec: &DeviceRecord,
        chain: &[Vec<u8>],
    ) -> Result<u64> {
        let _ = (rec, chain);
        Err(Error::unauthorized(
            "client certificate authentication is being built",
        ))
    }
}
