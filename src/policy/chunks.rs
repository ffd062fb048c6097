//! A node's packet filter in named chunks. Clients (capver ≥ 81) keep `PacketFilters` by
//! name and merge each map response's entries into what they hold (`null` drops one name,
//! `"*": null` drops them all), so a filter can change in part. Each rule's sources are
//! split into buckets (`Sources::buckets`), one chunk per bucket: a node joining a group
//! of thousands changes, in each filter that names the group, the chunks its addresses
//! fall in (about 256 sources each), not the whole rule.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::OnceLock;

use serde_json::Value;

use super::filter::FilterRule;

/// JSON text many receivers send alike (a bucket of sources), with its zstd frame once a
/// map stream first compresses it.
#[derive(Debug)]
pub struct SharedText {
    plain: bytes::Bytes,
    compressed: OnceLock<bytes::Bytes>,
}

impl SharedText {
    pub fn new(json: String) -> SharedText {
        SharedText {
            plain: json.into(),
            compressed: OnceLock::new(),
        }
    }

    /// The JSON text.
    pub fn plain(&self) -> &bytes::Bytes {
        &self.plain
    }

    /// The text compressed by `compress`, which runs once.
    pub fn compressed(&self, compress: impl FnOnce(&[u8]) -> bytes::Bytes) -> bytes::Bytes {
        self.compressed
            .get_or_init(|| compress(&self.plain))
            .clone()
    }
}

/// A piece of a filter chunk's wire JSON: text of its own receiver, or text shared by
/// every receiver whose filter holds the same sources.
#[derive(Debug)]
pub enum Piece<'a> {
    Own(String),
    Shared(&'a SharedText),
}

/// Part of a node's filter: the rules that grant the same thing, restricted to one
/// bucket of their sources.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterChunk {
    /// Names the chunk: what its rules grant and which bucket of sources.
    pub key: u64,
    /// Changes when its contents do.
    pub hash: u64,
    /// (rule, bucket) pairs, indices into the node's rules and their sources' buckets.
    parts: Vec<(usize, usize)>,
}

fn hash_of(value: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// `rules` (one node's filter) as chunks, by key. Costs the rules and their bucket
/// counts: bucket contents are hashed once per shared `Sources`.
pub fn filter_chunks(rules: &[FilterRule]) -> Vec<FilterChunk> {
    let mut chunks: BTreeMap<u64, FilterChunk> = BTreeMap::new();
    for (r, rule) in rules.iter().enumerate() {
        let mut h = DefaultHasher::new();
        rule.hash_all_but_sources(&mut h);
        let grants = h.finish();
        let buckets = rule.src_ips.buckets();
        for (b, bucket) in buckets.iter().enumerate() {
            if bucket.members.is_empty() {
                continue;
            }
            let key = hash_of((grants, buckets.len(), b));
            let chunk = chunks.entry(key).or_insert(FilterChunk {
                key,
                hash: 0,
                parts: Vec::new(),
            });
            chunk.hash = hash_of((chunk.hash, grants, bucket.hash));
            chunk.parts.push((r, b));
        }
    }
    chunks.into_values().collect()
}

/// The name in `PacketFilters` of the chunk with `key`.
pub fn chunk_name(key: u64) -> String {
    format!("{key:016x}")
}

impl FilterChunk {
    /// Its name in `PacketFilters`.
    pub fn name(&self) -> String {
        chunk_name(self.key)
    }

    /// Its rules on the wire; `rules` are the ones it was cut from.
    pub fn to_json(&self, rules: &[FilterRule]) -> Value {
        let json = self.parts.iter().map(|&(r, b)| {
            let rule = &rules[r];
            let sources: Vec<&str> = rule.src_ips.buckets()[b]
                .members
                .iter()
                .map(|&i| rule.src_ips[i as usize].as_str())
                .collect();
            rule.to_json_from(&sources)
        });
        Value::Array(json.collect())
    }

    /// Its rules on the wire as pieces (the same JSON as `to_json`, members in another
    /// order): the sources are shared text, so a change that reaches thousands of
    /// filters encodes and compresses each changed bucket once.
    pub fn pieces<'r>(&self, rules: &'r [FilterRule]) -> Vec<Piece<'r>> {
        let mut pieces = Vec::with_capacity(2 * self.parts.len() + 1);
        let mut own = String::from("[");
        for (n, &(r, b)) in self.parts.iter().enumerate() {
            let rule = &rules[r];
            if n > 0 {
                own.push(',');
            }
            own.push_str("{\"SrcIPs\":");
            pieces.push(Piece::Own(std::mem::take(&mut own)));
            pieces.push(Piece::Shared(rule.src_ips.bucket_text(b)));
            own.push_str(&rule.json_after_sources());
            own.push('}');
        }
        own.push(']');
        pieces.push(Piece::Own(own));
        pieces
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::PortRange;

    fn rule(sources: Vec<String>, port: u16) -> FilterRule {
        FilterRule {
            src_ips: sources.into(),
            dst_ports: vec![(
                "100.64.0.1".into(),
                PortRange {
                    first: port,
                    last: port,
                },
            )],
            ip_proto: Vec::new(),
            cap_grant: Vec::new(),
        }
    }

    fn addresses(n: u32) -> Vec<String> {
        (0..n)
            .map(|i| format!("100.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256))
            .collect()
    }

    /// The sources of every chunk's rules, as the client concatenates them.
    fn sources(rules: &[FilterRule], chunks: &[FilterChunk]) -> Vec<String> {
        let mut all: Vec<String> = chunks
            .iter()
            .flat_map(|c| c.to_json(rules).as_array().unwrap().clone())
            .flat_map(|r| r["SrcIPs"].as_array().unwrap().clone())
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        all.sort();
        all
    }

    #[test]
    fn chunks_together_hold_the_whole_filter() {
        let rules = vec![rule(addresses(3000), 22), rule(vec!["*".into()], 80)];
        let chunks = filter_chunks(&rules);
        assert!(chunks.len() > 2, "a large rule splits: {}", chunks.len());
        let mut want = addresses(3000);
        want.push("*".into());
        want.sort();
        assert_eq!(sources(&rules, &chunks), want);
    }

    #[test]
    fn one_more_source_changes_one_chunk() {
        let before = filter_chunks(&[rule(addresses(3000), 22)]);
        let after = filter_chunks(&[rule(addresses(3001), 22)]);
        let keys = |c: &[FilterChunk]| c.iter().map(|c| c.key).collect::<Vec<_>>();
        assert_eq!(keys(&before), keys(&after), "the same buckets");
        let changed = before.iter().zip(&after).filter(|(a, b)| a.hash != b.hash);
        assert_eq!(changed.count(), 1);
    }

    #[test]
    fn pieces_spell_the_same_rules_as_the_json() {
        let mut with_proto = rule(addresses(700), 22);
        with_proto.ip_proto = vec![6, 17];
        let rules = vec![
            with_proto,
            rule(addresses(700), 22),
            rule(vec!["*".into()], 80),
        ];
        for chunk in filter_chunks(&rules) {
            let text: String = chunk
                .pieces(&rules)
                .iter()
                .map(|p| match p {
                    Piece::Own(t) => t.clone(),
                    Piece::Shared(s) => String::from_utf8(s.plain().to_vec()).unwrap(),
                })
                .collect();
            let parsed: Value = serde_json::from_str(&text).expect("valid JSON");
            assert_eq!(parsed, chunk.to_json(&rules), "{text}");
        }
    }

    #[test]
    fn rules_granting_different_things_never_share_a_chunk() {
        let rules = vec![rule(addresses(10), 22), rule(addresses(10), 443)];
        let chunks = filter_chunks(&rules);
        assert_eq!(chunks.len(), 2);
        assert_ne!(chunks[0].key, chunks[1].key);
    }
}
