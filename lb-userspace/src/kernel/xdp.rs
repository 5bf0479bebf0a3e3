//! XDP on the uplinks: attached (native, else generic in `Auto` mode) or
//! adopted from a previous agent's pinned link, detached, released.

use aya::Ebpf;
use aya::programs::xdp::XdpLinkId;
use aya::programs::{ProgramError, Xdp, XdpMode};

use super::links::{self, Held};
use super::{AttachMode, Attached, Datapath, KernelError, TcRole, host, pin, program};
use crate::error_chain;

/// How an XDP attachment is held.
pub(super) type Link = Held<XdpLinkId>;

#[derive(Debug)]
pub(super) struct Attachment {
    pub(super) interface: String,
    pub(super) link: Link,
    pub(super) mode: Attached,
}

impl Datapath {
    pub(super) fn program(&mut self) -> Result<&mut Xdp, KernelError> {
        xdp_program(&mut self.ebpf)
    }

    /// Attaches the program to `interface`. With pins, a link a previous
    /// agent pinned for it is adopted: this program replaces the old one in
    /// it atomically, so no packet is missed and conntrack carries on.
    /// Otherwise a new link (pinned, when pinning); in `Auto` mode a driver
    /// without native XDP gets generic XDP, with a warning.
    ///
    /// Before XDP runs there: the interface goes into `XLB_REDIRECT_OK` and
    /// gets the uplink's tc program, so the program never hands a frame to
    /// a tc program that is not there yet (an adopted link runs the new
    /// program from the moment it is swapped in).
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<Attached, KernelError> {
        self.allow_redirect(&[interface.to_owned()])?;
        self.attach_tc(interface, TcRole::Uplink)?;
        self.attach_xdp(interface, mode)
    }

    /// Lets XDP redirect into `interfaces` (`XLB_REDIRECT_OK`). The agent
    /// calls it for every uplink before attaching to any, so that a link
    /// adopted from a previous agent never sees a map without the others.
    pub fn allow_redirect(&mut self, interfaces: &[String]) -> Result<(), KernelError> {
        for interface in interfaces {
            let Some(ifindex) = host::ifindex(interface) else {
                continue;
            };
            if ifindex >= self.redirect_ok.len() {
                // Past the array: its frames take the tc hand-off.
                continue;
            }
            self.redirect_ok
                .set(ifindex, 1, 0)
                .map_err(|source| KernelError::RedirectMap {
                    map: lb_common::maps::REDIRECT_OK,
                    interface: interface.clone(),
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    fn attach_xdp(&mut self, interface: &str, mode: AttachMode) -> Result<Attached, KernelError> {
        let pin_path = self.pins.as_ref().map(|pins| pins.link(interface));
        if let Some(path) = &pin_path {
            let adopted = links::adopt(self.program()?, path, |error| {
                log::warn!(
                    "{interface}: cannot reuse the pinned XDP link {} ({}); attaching anew",
                    path.display(),
                    error_chain(error.as_ref())
                );
            })?;
            if let Some(link) = adopted {
                self.attached.push(Attachment {
                    interface: interface.to_owned(),
                    link: Link::Pinned {
                        link,
                        path: path.clone(),
                    },
                    mode: Attached::Adopted,
                });
                return Ok(Attached::Adopted);
            }
        }
        let (id, attached) = self.attach_new(interface, mode)?;
        let link = match pin_path {
            None => Link::Owned(id),
            Some(path) => Link::Pinned {
                link: links::pin_new(self.program()?, id, interface, &path)?,
                path,
            },
        };
        self.attached.push(Attachment {
            interface: interface.to_owned(),
            link,
            mode: attached,
        });
        Ok(attached)
    }

    fn attach_new(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<(XdpLinkId, Attached), KernelError> {
        let program = self.program()?;
        let attach = |program: &mut Xdp, attached: Attached| {
            let (flags, mode) = match attached {
                Attached::Native => (XdpMode::Driver, "native"),
                _ => (XdpMode::Skb, "generic"),
            };
            program
                .attach(interface, flags)
                .map(|link| (link, attached))
                .map_err(|source| KernelError::Attach {
                    interface: interface.to_owned(),
                    mode,
                    source,
                })
        };
        match mode {
            AttachMode::Generic => attach(program, Attached::Generic),
            AttachMode::Native => attach(program, Attached::Native),
            AttachMode::Auto => match program.attach(interface, XdpMode::Driver) {
                Ok(link) => Ok((link, Attached::Native)),
                Err(native) if !is_unknown_interface(&native) => {
                    let generic = attach(program, Attached::Generic)?;
                    log::warn!(
                        "{interface}: native XDP unavailable ({}); using generic XDP, which is slower",
                        error_chain(&native)
                    );
                    Ok(generic)
                }
                Err(source) => Err(KernelError::Attach {
                    interface: interface.to_owned(),
                    mode: "native",
                    source,
                }),
            },
        }
    }

    /// Interfaces the program is attached to, in attach order.
    pub fn interfaces(&self) -> Vec<String> {
        self.attached.iter().map(|a| a.interface.clone()).collect()
    }

    /// How XDP is attached to `interface`, if it is.
    pub fn attached_mode(&self, interface: &str) -> Option<Attached> {
        self.attached
            .iter()
            .find(|a| a.interface == interface)
            .map(|a| a.mode)
    }

    /// Detaches the program from `interface`, if attached there (removing
    /// its pin).
    pub fn detach(&mut self, interface: &str) -> Result<(), KernelError> {
        let Some(index) = self.attached.iter().position(|a| a.interface == interface) else {
            return Ok(());
        };
        if let Some(ifindex) = host::ifindex(interface) {
            let _ = self.redirect_ok.set(ifindex, 0, 0);
        }
        self.detach_tc(interface, TcRole::Uplink);
        let attachment = self.attached.remove(index);
        self.detach_one(attachment.link)
            .map_err(|source| KernelError::Detach {
                interface: interface.to_owned(),
                source,
            })
    }

    fn detach_one(&mut self, link: Link) -> Result<(), ProgramError> {
        match link {
            Link::Owned(id) => self
                .program()
                .map_err(|_| ProgramError::NotLoaded)?
                .detach(id),
            Link::Pinned { link, path } => {
                // The kernel detaches when the last reference goes: the pin
                // and our fd.
                let removed = std::fs::remove_file(&path);
                drop(link);
                match removed {
                    Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                        Err(ProgramError::IOError(error))
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    /// Links pinned for interfaces the agent does not serve (left by a
    /// previous agent with another config): unpinned, so they detach.
    /// Returns the interfaces.
    pub fn unpin_stale_links(&mut self) -> Result<Vec<String>, KernelError> {
        let Some(pins) = &self.pins else {
            return Ok(Vec::new());
        };
        let mut stale = Vec::new();
        for interface in pins.pinned_links()? {
            if self.attached.iter().any(|a| a.interface == interface) {
                continue;
            }
            pin::remove_pin(&pins.link(&interface))?;
            stale.push(interface);
        }
        Ok(stale)
    }

    /// Detaches the program from every interface (pinned links too); returns
    /// the interfaces detached and a message for each failure.
    pub fn detach_all(&mut self) -> (Vec<String>, Vec<String>) {
        let mut detached = self.detach_all_tc();
        let attachments = std::mem::take(&mut self.attached);
        let mut failures = Vec::new();
        for attachment in attachments {
            let mode = attachment.mode;
            match self.detach_one(attachment.link) {
                Ok(()) => detached.push(format!("{} ({mode})", attachment.interface)),
                Err(error) => failures.push(format!(
                    "{}: cannot detach XDP: {}",
                    attachment.interface,
                    error_chain(&error)
                )),
            }
        }
        (detached, failures)
    }

    /// Leaves pinned links attached (the program keeps forwarding with the
    /// pinned maps while no agent runs); unpinned ones are detached, as
    /// they cannot outlive the agent. Returns the interfaces left attached
    /// and those detached.
    pub fn release_all(&mut self) -> (Vec<String>, Vec<String>) {
        let (mut kept, mut detached) = self.release_tc();
        for attachment in std::mem::take(&mut self.attached) {
            let program = self.program().ok();
            let pinned = attachment.link.release(|id| {
                if let Some(program) = program {
                    let _ = program.detach(id);
                }
            });
            if pinned {
                kept.push(attachment.interface);
            } else {
                detached.push(attachment.interface);
            }
        }
        (kept, detached)
    }
}

/// The object's XDP program.
pub(super) fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, KernelError> {
    program(ebpf, lb_common::maps::PROGRAM, |name, source| {
        KernelError::NotXdp { name, source }
    })
}

fn is_unknown_interface(error: &ProgramError) -> bool {
    matches!(error, ProgramError::UnknownInterface { .. })
}
