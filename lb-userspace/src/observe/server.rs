//! The /metrics /healthz /readyz listener.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;

use super::facts::Shared;
use super::http::{self, Request, Response};
use super::{ObserveError, metrics, steps};
use crate::error_chain;

/// Binds `address` now (so a taken port fails `xlb run` at once) and serves
/// it in the background. Returns the task and the address bound.
pub(super) fn start(
    address: SocketAddr,
    shared: Arc<Shared>,
) -> Result<(JoinHandle<()>, SocketAddr), ObserveError> {
    let listen = |source| ObserveError::Listen { address, source };
    let listener = std::net::TcpListener::bind(address).map_err(listen)?;
    listener.set_nonblocking(true).map_err(listen)?;
    let bound = listener.local_addr().map_err(listen)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(listen)?;
    let server = tokio::spawn(http::serve(listener, move |request| {
        handle(Arc::clone(&shared), request)
    }));
    Ok((server, bound))
}

async fn handle(shared: Arc<Shared>, request: Request) -> Response {
    match request.path.as_str() {
        "/metrics" => {
            let scrape = tokio::task::spawn_blocking(move || scrape(&shared)).await;
            match scrape {
                Ok(Ok(text)) => Response {
                    status: 200,
                    content_type: metrics::CONTENT_TYPE,
                    headers: Vec::new(),
                    body: text.into_bytes(),
                },
                Ok(Err(error)) => Response::text(500, format!("{error}\n")),
                Err(error) => Response::text(500, format!("scrape failed: {error}\n")),
            }
        }
        "/healthz" => Response::text(200, "ok\n"),
        "/readyz" => {
            if let Some((step, running)) = shared.steps.stuck(steps::STUCK_AFTER) {
                return Response::text(
                    503,
                    format!(
                        "not ready: {step} has been running for {} s\n",
                        running.as_secs()
                    ),
                );
            }
            let facts = shared.facts();
            if facts.status.ready {
                Response::text(200, "ready\n")
            } else {
                Response::text(503, format!("not ready: {}\n", facts.not_ready_reason()))
            }
        }
        "/" => Response::text(200, "xlb: /metrics /healthz /readyz\n"),
        _ => Response::text(404, "not found: try /metrics, /healthz or /readyz\n"),
    }
}

/// One /metrics body. Runs on a blocking thread: counting conntrack walks
/// the whole table.
fn scrape(shared: &Shared) -> Result<String, String> {
    let (agent, catalog) = {
        let facts = shared.facts();
        (facts.agent_metrics(), Arc::clone(&facts.catalog))
    };
    let maps = shared.maps();
    match metrics::render(&agent, &catalog, maps.as_deref()) {
        Ok(text) => Ok(text),
        Err(error) => {
            // Serve what the agent knows rather than nothing.
            tracing::warn!("metrics: {}", error_chain(&error));
            metrics::render(&agent, &catalog, None).map_err(|e| error_chain(&e))
        }
    }
}
