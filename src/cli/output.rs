//! Output: aligned tables for people, JSON or YAML documents for scripts.

pub use crate::proto::json::{time as time_json, time_text};
use serde_json::Value;

use super::CliError;

/// `-o table|json|yaml`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

/// What a command produced: one JSON document, and the text shown in table mode.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub json: Value,
    pub table: String,
}

impl Output {
    pub fn new(json: Value, table: impl Into<String>) -> Self {
        Output {
            json,
            table: table.into(),
        }
    }
}

/// Renders `output` as the full text for stdout (ending in a newline unless empty).
pub fn render(format: Format, output: &Output) -> Result<String, CliError> {
    let mut text = match format {
        Format::Table => output.table.clone(),
        Format::Json => serde_json::to_string_pretty(&output.json)
            .map_err(|e| CliError::other(format!("encoding JSON: {e}")))?,
        Format::Yaml => serde_yaml::to_string(&output.json)
            .map_err(|e| CliError::other(format!("encoding YAML: {e}")))?,
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

/// A table whose columns are padded to their widest cell, separated by two spaces.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0usize; columns];
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, cell) in line.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            let mut text = String::new();
            for (i, cell) in line.iter().enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                text.push_str(cell);
                let pad = widths[i] - cell.chars().count();
                text.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A time for a table cell: `-` when unset.
pub fn time_cell(t: &Option<prost_types::Timestamp>) -> String {
    time_text(t).unwrap_or_else(|| "-".to_string())
}

pub fn opt_cell<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_string(), |v| v.to_string())
}

pub fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_are_aligned_to_the_widest_cell() {
        let mut t = Table::new(&["ID", "NAME"]);
        t.row(vec!["1".into(), "alice".into()]);
        t.row(vec!["100".into(), "b".into()]);
        assert_eq!(t.render(), "ID   NAME\n1    alice\n100  b\n");
    }

    #[test]
    fn times_are_rfc3339_or_null() {
        let t = Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        });
        assert_eq!(time_json(&t), Value::String("2023-11-14T22:13:20Z".into()));
        assert_eq!(time_json(&None), Value::Null);
        assert_eq!(time_cell(&None), "-");
    }

    #[test]
    fn json_and_yaml_render_the_document() {
        let out = Output::new(serde_json::json!({"a": 1}), "A\n1");
        assert_eq!(render(Format::Table, &out).unwrap(), "A\n1\n");
        let json: Value = serde_json::from_str(&render(Format::Json, &out).unwrap()).unwrap();
        assert_eq!(json, serde_json::json!({"a": 1}));
        assert_eq!(render(Format::Yaml, &out).unwrap(), "a: 1\n");
    }
}
