//! tc programs: the uplink's, next to XDP (it sends on the frames XDP
//! hands off), and the pod/tunnel one on pods' veths and tunnel devices
//! (reverse NAT of replies). A tcx link where the kernel has tcx (pinned,
//! adoptable), else a clsact filter.

use std::fmt;

use aya::Ebpf;
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::{SchedClassifier, TcAttachType};

use super::links::{self, Held};
use super::{Datapath, KernelError, host, pin, program};
use crate::error_chain;

/// Which tc program an interface gets (see lb-ebpf/src/tc.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcRole {
    /// An uplink, next to XDP: sends on the frames XDP hands off.
    Uplink,
    /// A pod's host-side veth or a tunnel device: reverse NAT of replies.
    Pod,
}

impl TcRole {
    pub(super) fn program(self) -> &'static str {
        match self {
            TcRole::Uplink => lb_common::maps::PROGRAM_TC_UPLINK,
            TcRole::Pod => lb_common::maps::PROGRAM_TC_POD,
        }
    }

    /// The role's part of its pin name (`tc/<role>-<interface>`).
    pub(super) fn pin_name(self) -> &'static str {
        match self {
            TcRole::Uplink => "uplink",
            TcRole::Pod => "pod",
        }
    }
}

/// A tc attachment's link: owned by the program (a clsact filter, or
/// unpinned), or a tcx link pinned when the maps are.
type TcLink = Held<SchedClassifierLinkId>;

/// How a tc program got attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcHook {
    /// A tcx link (kernel 6.6+): no qdisc, ordered with other programs.
    Tcx,
    /// The clsact qdisc's ingress filter (older kernels).
    Clsact,
}

impl fmt::Display for TcHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TcHook::Tcx => "tcx",
            TcHook::Clsact => "clsact",
        })
    }
}

#[derive(Debug)]
pub(super) struct TcAttachment {
    interface: String,
    /// The interface's index when attached: a pod's veth deleted and made
    /// again under the same name is a new device that needs a new link.
    ifindex: u32,
    role: TcRole,
    link: TcLink,
}

impl Datapath {
    fn tc_program(&mut self, role: TcRole) -> Result<&mut SchedClassifier, KernelError> {
        tc_program(&mut self.ebpf, role)
    }

    /// Attaches `role`'s tc program at `interface`'s ingress: a tcx link
    /// where the kernel has tcx (pinned at `tc/<role>-<interface>` when the
    /// maps are pinned, so it outlives the agent with `--keep-attached`;
    /// one a previous agent pinned there is adopted: this program is
    /// swapped into it, with no gap), else a filter on a clsact qdisc
    /// (added if missing). Replaces an attachment of an older device of
    /// that name.
    pub fn attach_tc(&mut self, interface: &str, role: TcRole) -> Result<TcHook, KernelError> {
        self.detach_tc(interface, role);
        let ifindex = host::ifindex(interface).unwrap_or(0);
        let pin_path = self
            .pins
            .as_ref()
            .map(|pins| pins.tc_link(role.pin_name(), interface));
        if let Some(path) = &pin_path {
            // One that cannot be reused was made for a device that is gone
            // (a pod's veth made again under the same name): attach anew.
            let adopted = links::adopt(self.tc_program(role)?, path, |error| {
                log::debug!(
                    "{interface}: not reusing the pinned tc link {} ({})",
                    path.display(),
                    error_chain(error.as_ref())
                );
            })?;
            if let Some(link) = adopted {
                self.tc.push(TcAttachment {
                    interface: interface.to_owned(),
                    ifindex,
                    role,
                    link: TcLink::Pinned {
                        link,
                        path: path.clone(),
                    },
                });
                return Ok(TcHook::Tcx);
            }
        }
        let (id, hook) = self.attach_tc_new(interface, role)?;
        let link = match (hook, pin_path) {
            (TcHook::Tcx, Some(path)) => TcLink::Pinned {
                link: links::pin_new(self.tc_program(role)?, id, interface, &path)?,
                path,
            },
            _ => TcLink::Owned(id),
        };
        self.tc.push(TcAttachment {
            interface: interface.to_owned(),
            ifindex,
            role,
            link,
        });
        Ok(hook)
    }

    fn attach_tc_new(
        &mut self,
        interface: &str,
        role: TcRole,
    ) -> Result<(SchedClassifierLinkId, TcHook), KernelError> {
        let name = role.program();
        let program = self.tc_program(role)?;
        let (id, hook) = match program.attach(interface, TcAttachType::Ingress) {
            Ok(id) => (id, hook_kind()),
            Err(first) => {
                // Before tcx: the clsact qdisc must exist first.
                let _ = aya::programs::tc::qdisc_add_clsact(interface);
                let id = program
                    .attach_with_options(
                        interface,
                        TcAttachType::Ingress,
                        aya::programs::tc::TcAttachOptions::Netlink(Default::default()),
                    )
                    .map_err(|_| KernelError::AttachTc {
                        name,
                        interface: interface.to_owned(),
                        source: Box::new(first),
                    })?;
                (id, TcHook::Clsact)
            }
        };
        Ok((id, hook))
    }

    /// Detaches `role`'s tc program from `interface`, if attached there. A
    /// device that is gone took its attachment with it; that is no error.
    pub fn detach_tc(&mut self, interface: &str, role: TcRole) {
        let Some(index) = self
            .tc
            .iter()
            .position(|a| a.interface == interface && a.role == role)
        else {
            return;
        };
        let attachment = self.tc.remove(index);
        match attachment.link {
            TcLink::Owned(id) => {
                if let Ok(program) = self.tc_program(role)
                    && let Err(error) = program.detach(id)
                {
                    log::debug!(
                        "{interface}: detaching tc: {} (the device may be gone)",
                        error_chain(&error)
                    );
                }
            }
            // The kernel detaches when the last reference goes: the pin
            // and our fd.
            TcLink::Pinned { link, path } => {
                if let Err(error) = pin::remove_pin(&path) {
                    log::warn!("{interface}: {}", error_chain(&error));
                }
                drop(link);
            }
        }
    }

    /// tc links pinned for devices this agent did not attach to (a pod
    /// deleted while no agent ran, an uplink no longer chosen): unpinned,
    /// so they detach. Returns their pin names.
    pub fn unpin_stale_tc_links(&mut self) -> Result<Vec<String>, KernelError> {
        let Some(pins) = &self.pins else {
            return Ok(Vec::new());
        };
        let mut stale = Vec::new();
        for name in pins.pinned_tc_links()? {
            let path = pins.tc_links_dir().join(&name);
            let current = self
                .tc
                .iter()
                .any(|a| matches!(&a.link, TcLink::Pinned { path: p, .. } if *p == path));
            if !current {
                pin::remove_pin(&path)?;
                stale.push(name);
            }
        }
        Ok(stale)
    }

    /// Interfaces with the pod/tunnel tc program, with the ifindex each had
    /// when attached.
    pub fn tc_pod_interfaces(&self) -> Vec<(String, u32)> {
        self.tc
            .iter()
            .filter(|a| a.role == TcRole::Pod)
            .map(|a| (a.interface.clone(), a.ifindex))
            .collect()
    }

    pub(super) fn detach_all_tc(&mut self) -> Vec<String> {
        let attachments: Vec<(String, TcRole)> = self
            .tc
            .iter()
            .map(|a| (a.interface.clone(), a.role))
            .collect();
        let mut detached = Vec::new();
        for (interface, role) in attachments {
            self.detach_tc(&interface, role);
            if role == TcRole::Pod {
                detached.push(format!("{interface} (tc)"));
            }
        }
        detached
    }

    /// Pinned tc links stay (pods' replies and the uplinks' hand-off keep
    /// working); owned ones (clsact filters) go with the agent. Returns the
    /// attachments kept and those detached.
    pub(super) fn release_tc(&mut self) -> (Vec<String>, Vec<String>) {
        let mut kept = Vec::new();
        let mut detached = Vec::new();
        for attachment in std::mem::take(&mut self.tc) {
            let label = format!(
                "{} (tc {})",
                attachment.interface,
                attachment.role.pin_name()
            );
            let program = self.tc_program(attachment.role).ok();
            let pinned = attachment.link.release(|id| {
                if let Some(program) = program {
                    let _ = program.detach(id);
                }
            });
            if pinned {
                kept.push(label);
            } else {
                detached.push(label);
            }
        }
        (kept, detached)
    }
}

/// The object's tc program for `role`.
pub(super) fn tc_program(
    ebpf: &mut Ebpf,
    role: TcRole,
) -> Result<&mut SchedClassifier, KernelError> {
    program(ebpf, role.program(), |name, source| KernelError::NotTc {
        name,
        source,
    })
}

/// What `SchedClassifier::attach` uses on this kernel.
fn hook_kind() -> TcHook {
    use aya::util::KernelVersion;
    if KernelVersion::current().is_ok_and(|version| version >= KernelVersion::new(6, 6, 0)) {
        TcHook::Tcx
    } else {
        TcHook::Clsact
    }
}
