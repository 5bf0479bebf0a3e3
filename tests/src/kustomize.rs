//! `kubectl kustomize DIR` as YAML values, one per rendered object: what
//! the deploy, monitoring and container tests read the manifests from.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, ensure};
use serde::Deserialize as _;
use serde_yaml::Value;

/// Renders the kustomization in `dir`; empty documents are left out.
pub fn render(dir: &Path) -> anyhow::Result<Vec<Value>> {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .context("cannot run kubectl (is it installed?)")?;
    ensure!(
        output.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout)?;
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = Value::deserialize(document)?;
        if !value.is_null() {
            objects.push(value);
        }
    }
    Ok(objects)
}
