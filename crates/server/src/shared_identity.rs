//! One identity for every node of a cluster: when the store is shared (PostgreSQL), the access
//! policies, the public hostname and ports, and the development CA live in its meta table, so
//! every node takes the same keys and serves a certificate signed by the same CA. The first
//! node to start writes its own (a checked commit, so two first starts settle on one); every
//! later node adopts what is stored and writes it into its data dir (`hub.json`, `tls/ca.pem`,
//! `tls/ca-bundle.pem`) exactly as a single node does, so clients trust a cluster the same way.
//! Collaborators: `hub_file` (the local copy), `tls` (the CA files), the store.

use serde::{Deserialize, Serialize};
use twinhub_store::{Expect, Store, Table, Write};

use crate::error::ServerError;
use crate::hub_file::HubFile;

/// The meta key the identity is kept under.
pub const KEY: &str = "cluster/identity";

/// What every node of a cluster shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SharedIdentity {
    /// The first node's `hub.json`: policies, and the hostname and ports clients are given.
    pub hub: HubFile,
    /// The development CA (certificate and key, PEM); absent when the first node served an
    /// operator's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaPair>,
}

/// A CA certificate with its private key, both PEM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaPair {
    pub cert_pem: String,
    pub key_pem: String,
}

fn corrupt(e: impl std::fmt::Display) -> ServerError {
    ServerError::Config(format!(
        "the cluster identity in the store ({KEY} in the meta table) cannot be read: {e}"
    ))
}

/// The identity the store holds, if a node has written one.
pub async fn read(store: &dyn Store) -> Result<Option<SharedIdentity>, ServerError> {
    match store.get(Table::Meta, KEY).await? {
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(corrupt),
        None => Ok(None),
    }
}

/// Stores `candidate` unless an identity is there already, and returns the one that is.
pub async fn adopt(
    store: &dyn Store,
    candidate: SharedIdentity,
) -> Result<SharedIdentity, ServerError> {
    if let Some(stored) = read(store).await? {
        return Ok(stored);
    }
    let bytes = serde_json::to_vec(&candidate).map_err(corrupt)?;
    let written = store
        .commit_checked(
            vec![Expect::absent(Table::Meta, KEY)],
            vec![Write::put(Table::Meta, KEY, bytes)],
        )
        .await?;
    if written {
        tracing::info!("this node is the cluster's first: its policies and CA are now shared");
        return Ok(candidate);
    }
    // Another node's first start won the race: take its identity.
    read(store)
        .await?
        .ok_or_else(|| corrupt("it vanished right after another node wrote it"))
}

/// The shared `hub.json` of the cluster whose store is at `url` (for the CLI, which cannot
/// ask a node's data dir when it runs elsewhere).
pub async fn hub_file_from_store(url: &str) -> Result<HubFile, ServerError> {
    let store = crate::open_shared_store(url).await?;
    let found = read(&*store).await;
    // Only reads were made; closing settles nothing, and its failure changes no answer.
    let _ = store.close().await;
    match found? {
        Some(identity) => Ok(identity.hub),
        None => Err(ServerError::Config(
            "the store holds no cluster identity yet: start a node with --store first".into(),
        )),
    }
}
