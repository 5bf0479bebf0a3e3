//! Start-up from a cluster source: the datapath is loaded (its XDP program
//! verified, about a second) while the source lists the cluster (about as
//! long for 10,000 Services), not after. Its maps' sizes come from the
//! config file alone (each Service's selection table is made at its own
//! size when written), so the early load is the load; only a config file
//! changed meanwhile has it loaded again.

use log::{info, warn};

use super::config::map_sizes;
use super::grow::MapCapacity;
use super::{AgentError, Load, Opening, RunOptions, Start};
use crate::kernel::{Datapath, Loaded, MapSizes, PinDir, pin, seed::SeedOrigin};
use crate::observe::{self, Observe};

/// The config to start with and the datapath loaded for it.
pub(super) async fn open_and_load(
    options: &RunOptions,
    opening: Opening,
    pins: Option<&PinDir>,
    hash_seed: (u64, SeedOrigin),
    observe: &mut Observe,
) -> Result<(Start, MapSizes, Load), AgentError> {
    let early = guess(&opening, pins, options.map_capacity).map(|guessed| {
        let pins = pins.cloned();
        let debug = options.observe.datapath_debug;
        let task = tokio::task::spawn_blocking(move || {
            Datapath::load_with(guessed, pins.as_ref(), debug, &observe::datapath::OBSERVED)
        });
        (guessed, task)
    });
    let start = opening.complete().await;
    let sizes = map_sizes(&start.config.state, options.map_capacity);
    if let Some((guessed, task)) = early {
        match task.await {
            Ok(loaded) if fits(&guessed, &sizes) => {
                let load = Load::loaded(loaded?, guessed, pins, hash_seed, observe)?;
                return Ok((start, guessed, load));
            }
            Ok(loaded) => {
                info!(
                    "the config now wants other map sizes ({sizes:?}, loaded {guessed:?}): \
                     loading the datapath again"
                );
                discard(loaded, &guessed, pins);
            }
            Err(error) => warn!("loading the datapath early failed ({error}); loading it now"),
        }
    }
    let load = Load::datapath(options, sizes, pins, hash_seed, observe)?;
    Ok((start, sizes, load))
}

/// The sizes to load the datapath with before the cluster is listed, if
/// that is safe: only from a cluster source, and only when nothing is
/// pinned yet (a load that might be redone must not decide whether a
/// previous agent's pinned maps are adopted).
fn guess(opening: &Opening, pins: Option<&PinDir>, capacity: MapCapacity) -> Option<MapSizes> {
    opening.services.as_ref()?;
    let state = &opening.config.state;
    let fresh = pins.is_none_or(|pins| {
        pin::map_specs(&map_sizes(state, capacity))
            .iter()
            .all(|spec| !pins.map(spec.name).exists())
    });
    if !fresh {
        return None;
    }
    Some(map_sizes(state, capacity))
}

/// Whether a datapath loaded with `loaded` sizes serves a config that
/// wants `wanted`.
fn fits(loaded: &MapSizes, wanted: &MapSizes) -> bool {
    loaded == wanted
}

/// Drops a datapath loaded too small, and the pins its load made (so the
/// next load does not report them as a previous agent's that do not fit).
fn discard(
    loaded: Result<Loaded, crate::kernel::KernelError>,
    sizes: &MapSizes,
    pins: Option<&PinDir>,
) {
    drop(loaded);
    let Some(pins) = pins else {
        return;
    };
    for spec in pin::map_specs(sizes) {
        let path = pins.map(spec.name);
        if let Err(error) = std::fs::remove_file(&path)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            warn!("cannot remove {}: {error}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_sizes_loaded_fit() {
        let loaded = MapSizes::default();
        assert!(fits(&loaded, &loaded));
        let other_flows = MapSizes {
            flows: loaded.flows / 2,
            ..loaded
        };
        assert!(!fits(&loaded, &other_flows), "conntrack is sized exactly");
    }
}
