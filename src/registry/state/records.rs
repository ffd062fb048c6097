//! The registry as stored records: one JSON value per key, written by the state machine
//! for each record an entry touched, and read back on start or from a snapshot.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Meta, Recent, Registry, StoreError};
use crate::registry::change::Record;
use crate::registry::command::RequestId;
use crate::registry::types::*;

/// Where the policy and DNS settings go. A member's own store keeps them as records of their
/// own, written only when they change: the counters in `meta` change with most creating
/// writes (every registration), and rewriting a large policy with each filled rocksdb's
/// memtables. A snapshot keeps them inside `meta`, the layout members of earlier versions
/// read, so members of mixed versions still exchange snapshots during a rolling upgrade.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    Store,
    Snapshot,
}

/// The `meta` record as stored in either layout.
#[derive(Serialize, Deserialize)]
struct MetaRecord {
    #[serde(flatten)]
    meta: Meta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dns: Option<DnsSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    policy: Option<String>,
}

fn enc<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("registry types always serialize")
}

impl Registry {
    /// The storage key and current value of a record (`None` = deleted), as this member
    /// stores it (`Layout::Store`).
    pub fn encode_record(&self, record: &Record) -> (Vec<u8>, Option<Vec<u8>>) {
        match record {
            Record::Meta => (b"meta".to_vec(), Some(enc(&*self.meta))),
            Record::Policy => (b"policy".to_vec(), Some(enc(&*self.policy))),
            Record::Dns => (b"dns".to_vec(), self.dns.as_deref().map(enc)),
            Record::Clock => (b"clock".to_vec(), Some(enc(&self.clock))),
            Record::Settings => (b"settings".to_vec(), self.settings.as_deref().map(enc)),
            Record::User(id) => (
                format!("user/{:020}", id.0).into_bytes(),
                self.users.get(id).map(|u| enc(u.as_ref())),
            ),
            Record::Node(id) => (
                format!("node/{:020}", id.0).into_bytes(),
                self.nodes.get(id).map(|n| enc(n.as_ref())),
            ),
            Record::PreAuthKey(id) => (
                format!("preauthkey/{:020}", id.0).into_bytes(),
                self.preauth_keys.get(id).map(|k| enc(k.as_ref())),
            ),
            Record::ApiKey(id) => (
                format!("apikey/{:020}", id.0).into_bytes(),
                self.api_keys.get(id).map(|k| enc(k.as_ref())),
            ),
            Record::Pending(id) => (
                format!("pending/{id}").into_bytes(),
                self.pending.get(id.as_str()).map(|p| enc(p.as_ref())),
            ),
            Record::Recent(id) => (
                format!("recent/{id}").into_bytes(),
                self.recent.get(id).map(|r| enc(r.as_ref())),
            ),
            Record::Audit(seq) => (
                format!("audit/{seq:020}").into_bytes(),
                self.audit.get(seq).map(|r| enc(r.as_ref())),
            ),
            Record::PolicyVersion(v) => (
                format!("policyversion/{v:020}").into_bytes(),
                self.policy_versions.get(v).map(|p| enc(p.as_ref())),
            ),
            Record::MemberDerpKey(id) => (
                format!("memberderp/{id:020}").into_bytes(),
                self.member_derp_keys.get(id).map(|k| enc(&hex::encode(k))),
            ),
        }
    }

    /// Every record, as this member stores them.
    pub fn all_records(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.records_in(Layout::Store)
    }

    /// Every record, as a snapshot carries them.
    pub fn snapshot_records(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.records_in(Layout::Snapshot)
    }

    fn records_in(&self, layout: Layout) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut records = vec![Record::Meta, Record::Clock, Record::Settings];
        if layout == Layout::Store {
            records.extend([Record::Policy, Record::Dns]);
        }
        records.extend(self.users.keys().map(|id| Record::User(*id)));
        records.extend(self.nodes.keys().map(|id| Record::Node(*id)));
        records.extend(self.preauth_keys.keys().map(|id| Record::PreAuthKey(*id)));
        records.extend(self.api_keys.keys().map(|id| Record::ApiKey(*id)));
        records.extend(
            self.pending
                .keys()
                .map(|id| Record::Pending(id.to_string())),
        );
        records.extend(self.recent.keys().map(|id| Record::Recent(*id)));
        records.extend(self.audit.keys().map(|seq| Record::Audit(*seq)));
        records.extend(
            self.policy_versions
                .keys()
                .map(|v| Record::PolicyVersion(*v)),
        );
        records.extend(
            self.member_derp_keys
                .keys()
                .map(|id| Record::MemberDerpKey(*id)),
        );
        records
            .iter()
            .filter_map(|r| {
                let (k, v) = match (layout, r) {
                    (Layout::Snapshot, Record::Meta) => {
                        (b"meta".to_vec(), Some(self.inline_meta()))
                    }
                    _ => self.encode_record(r),
                };
                v.map(|v| (k, v))
            })
            .collect()
    }

    /// `meta` with the policy and DNS settings inside it, as every version reads it.
    fn inline_meta(&self) -> Vec<u8> {
        enc(&MetaRecord {
            meta: (*self.meta).clone(),
            dns: self.dns.as_deref().cloned(),
            policy: Some(self.policy.to_string()),
        })
    }

    /// Rebuilds a registry from stored records (as written by `encode_record`).
    pub fn from_records(
        records: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> Result<Self, StoreError> {
        let mut reg = Registry::default();
        for (key, value) in records {
            let key = String::from_utf8_lossy(&key).into_owned();
            reg.load_record(&key, &value)?;
        }
        Ok(reg)
    }

    fn load_record(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        fn de<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, StoreError> {
            serde_json::from_slice(value).map_err(|source| StoreError::Decode {
                key: key.to_string(),
                source,
            })
        }
        let (kind, rest) = key.split_once('/').unwrap_or((key, ""));
        match kind {
            "meta" => {
                let record: MetaRecord = de(key, value)?;
                self.meta = Arc::new(record.meta);
                // Inline in snapshots and in stores written before they had records of
                // their own; absent otherwise (and then their own records set them).
                if let Some(policy) = record.policy {
                    self.set_policy_text(policy.into());
                }
                if let Some(dns) = record.dns {
                    self.dns = Some(Arc::new(dns));
                }
            }
            "policy" => self.set_policy_text(de::<String>(key, value)?.into()),
            "dns" => self.dns = Some(Arc::new(de(key, value)?)),
            "clock" => self.clock = de(key, value)?,
            "settings" => self.settings = Some(Arc::new(de(key, value)?)),
            "user" => {
                let u: User = de(key, value)?;
                self.user_by_name.insert(u.name.as_str().into(), u.id);
                self.users.insert(u.id, Arc::new(u));
            }
            "node" => {
                let n: Node = de(key, value)?;
                self.index(&n);
                self.nodes.insert(n.id, Arc::new(n));
            }
            "preauthkey" => {
                let k: PreAuthKey = de(key, value)?;
                self.preauth_by_prefix
                    .insert(k.prefix.as_str().into(), k.id);
                self.preauth_keys.insert(k.id, Arc::new(k));
            }
            "apikey" => {
                let k: ApiKey = de(key, value)?;
                self.api_by_prefix.insert(k.prefix.as_str().into(), k.id);
                self.api_keys.insert(k.id, Arc::new(k));
            }
            "pending" => self.insert_pending(de(key, value)?),
            "recent" => {
                let id = u128::from_str_radix(rest, 16)
                    .map(RequestId)
                    .map_err(|_| StoreError::UnknownKey(key.to_string()))?;
                let r: Recent = de(key, value)?;
                self.recent_by_age.insert((r.at, id));
                self.recent.insert(id, Arc::new(r));
            }
            "audit" => {
                let r: AuditRecord = de(key, value)?;
                self.next_audit = self.next_audit.max(r.seq + 1);
                self.audit.insert(r.seq, Arc::new(r));
            }
            "policyversion" => {
                let p: PolicyVersion = de(key, value)?;
                self.policy_versions.insert(p.version, Arc::new(p));
            }
            "memberderp" => {
                let id: u64 = rest
                    .parse()
                    .map_err(|_| StoreError::UnknownKey(key.to_string()))?;
                let text: String = de(key, value)?;
                let mut k = [0u8; 32];
                hex::decode_to_slice(&text, &mut k)
                    .map_err(|_| StoreError::UnknownKey(key.to_string()))?;
                self.member_derp_keys.insert(id, k);
            }
            _ => return Err(StoreError::UnknownKey(key.to_string())),
        }
        Ok(())
    }
}
