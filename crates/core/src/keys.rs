//! Randomness and clocks the hub needs: symmetric keys, generation ids, and IoT Hub's
//! timestamp text.

use base64::Engine as _;

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // The OS random source failing is not recoverable: no key can be made safely.
    getrandom::fill(&mut buf).expect("the operating system's random source failed");
    buf
}

/// A fresh 256-bit symmetric key, base64-encoded as IoT Hub shows keys.
pub fn generate_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(random_bytes::<32>())
}

/// A generation id: an 18-digit decimal string, as IoT Hub assigns.
pub fn generation_id() -> String {
    let n = u64::from_le_bytes(random_bytes::<8>()) % 900_000_000_000_000_000;
    (n + 100_000_000_000_000_000).to_string()
}

/// A short random hex id for tracking errors in logs.
pub fn tracking_id() -> String {
    random_bytes::<16>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A random UUID (version 4) in its usual text form: the lock tokens of cloud-to-device and
/// feedback messages.
pub fn lock_token() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Now, in IoT Hub's timestamp text.
pub fn now_text() -> String {
    twinhub_proto::time::format_timestamp(jiff::Timestamp::now())
}

/// Now, in unix seconds.
pub fn now_unix() -> u64 {
    u64::try_from(jiff::Timestamp::now().as_second()).unwrap_or(0)
}

/// Now, in unix milliseconds.
pub fn now_millis() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// Now, in unix microseconds.
pub fn now_micros() -> u64 {
    u64::try_from(jiff::Timestamp::now().as_microsecond()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_256_bit_and_distinct() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&a)
            .unwrap();
        assert_eq!(raw.len(), 32);
    }

    #[test]
    fn generation_ids_have_18_digits() {
        for _ in 0..100 {
            let g = generation_id();
            assert_eq!(g.len(), 18, "{g}");
            assert!(g.bytes().all(|b| b.is_ascii_digit()));
        }
    }
}
