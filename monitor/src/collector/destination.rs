//! What the collector's sinks deliver to: a destination takes batches of stored records, alerts
//! decoded, anything else a Fluent client sent as JSON.

use super::store::Stored;
use crate::alert::Alert;

/// A stored record as the sinks see it.
pub enum Item {
    Alert(Box<Alert>),
    /// Something else a Fluent client sent: its tag, time and record as JSON.
    Other {
        tag: String,
        time_ns: u64,
        record: serde_json::Value,
    },
}

impl Item {
    pub fn of(stored: &Stored) -> Self {
        if stored.id.is_some() {
            if let Ok(mut alert) = rmp_serde::from_slice::<Alert>(&stored.record) {
                alert.ts = stored.time_ns;
                return Item::Alert(Box::new(alert));
            }
        }
        let value = rmpv::decode::read_value(&mut stored.record.as_slice()).unwrap_or(rmpv::Value::Nil);
        Item::Other { tag: stored.tag.clone(), time_ns: stored.time_ns, record: json_of(&value) }
    }
}

/// MessagePack to JSON: byte strings that are not UTF-8 become base64.
pub fn json_of(v: &rmpv::Value) -> serde_json::Value {
    use base64::Engine as _;
    use rmpv::Value as M;
    use serde_json::Value as J;
    match v {
        M::Nil => J::Null,
        M::Boolean(b) => J::Bool(*b),
        M::Integer(i) => i.as_i64().map(J::from).or_else(|| i.as_u64().map(J::from)).unwrap_or(J::Null),
        M::F32(f) => serde_json::Number::from_f64(*f as f64).map_or(J::Null, J::Number),
        M::F64(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        M::String(s) => match s.as_str() {
            Some(t) => J::String(t.to_string()),
            None => J::String(base64::engine::general_purpose::STANDARD.encode(s.as_bytes())),
        },
        M::Binary(b) => J::String(base64::engine::general_purpose::STANDARD.encode(b)),
        M::Array(a) => J::Array(a.iter().map(json_of).collect()),
        M::Map(m) => J::Object(
            m.iter()
                .map(|(k, v)| {
                    let key = match k {
                        M::String(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                        other => other.to_string(),
                    };
                    (key, json_of(v))
                })
                .collect(),
        ),
        M::Ext(t, d) => serde_json::json!({ "ext": t, "data": base64::engine::general_purpose::STANDARD.encode(d) }),
    }
}

/// Where a destination takes records.
pub trait Destination: Send {
    /// Delivers a batch; `Err` leaves the cursor where it was, to retry.
    fn deliver(&mut self, items: &[Item]) -> anyhow::Result<()>;

    /// Where the destination stands after its last delivery, saved with the sink's position
    /// and handed back when it is opened again (a file's length; see `lines_file`).
    fn end(&self) -> Option<u64> {
        None
    }
}
