//! Links of attached programs, XDP's and tc's alike: how an attachment is
//! held, a link a previous agent pinned adopted with this agent's program
//! swapped in (no packet missed), and new links pinned to outlive the
//! agent.

use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, SchedClassifierLinkId};
use aya::programs::xdp::{XdpLink, XdpLinkId};
use aya::programs::{ProgramError, SchedClassifier, Xdp};

use super::{KernelError, PinError, pin};

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How an attachment is held.
#[derive(Debug)]
pub(super) enum Held<Id> {
    /// Owned by the program: detached when the program is dropped.
    Owned(Id),
    /// Pinned at `path`: stays attached after the agent exits
    /// (`--keep-attached`), until the pin is removed.
    Pinned { link: FdLink, path: PathBuf },
}

impl<Id> Held<Id> {
    /// Leaves a pinned link attached (true: the program keeps running
    /// while no agent runs); an owned one cannot outlive the agent and is
    /// detached with `detach` (false).
    pub(super) fn release(self, detach: impl FnOnce(Id)) -> bool {
        match self {
            Held::Pinned { link, .. } => {
                drop(link);
                true
            }
            Held::Owned(id) => {
                detach(id);
                false
            }
        }
    }
}

/// A program whose links can be pinned and swapped: XDP's and tcx's.
pub(super) trait LinkProgram {
    type Link: TryFrom<FdLink, Error = LinkError>;
    type Id;
    fn attach_to_link(&mut self, link: Self::Link) -> Result<Self::Id, ProgramError>;
    fn take_link(&mut self, id: Self::Id) -> Result<Self::Link, ProgramError>;
}

impl LinkProgram for Xdp {
    type Link = XdpLink;
    type Id = XdpLinkId;
    fn attach_to_link(&mut self, link: XdpLink) -> Result<XdpLinkId, ProgramError> {
        Xdp::attach_to_link(self, link)
    }
    fn take_link(&mut self, id: XdpLinkId) -> Result<XdpLink, ProgramError> {
        Xdp::take_link(self, id)
    }
}

impl LinkProgram for SchedClassifier {
    type Link = SchedClassifierLink;
    type Id = SchedClassifierLinkId;
    fn attach_to_link(
        &mut self,
        link: SchedClassifierLink,
    ) -> Result<SchedClassifierLinkId, ProgramError> {
        SchedClassifier::attach_to_link(self, link)
    }
    fn take_link(
        &mut self,
        id: SchedClassifierLinkId,
    ) -> Result<SchedClassifierLink, ProgramError> {
        SchedClassifier::take_link(self, id)
    }
}

/// The link a previous agent pinned at `path`, if any, with `program`
/// swapped into it atomically. One that cannot be reused (`why_not` logs
/// why) is unpinned and `None` returned: the caller attaches anew.
pub(super) fn adopt<P: LinkProgram>(
    program: &mut P,
    path: &Path,
    why_not: impl FnOnce(&BoxError),
) -> Result<Option<FdLink>, PinError>
where
    FdLink: TryFrom<P::Link, Error = LinkError>,
{
    if !path.exists() {
        return Ok(None);
    }
    match swap_into(program, path) {
        Ok(link) => Ok(Some(link)),
        Err(error) => {
            why_not(&error);
            pin::remove_pin(path)?;
            Ok(None)
        }
    }
}

/// Swaps `program` into the link pinned at `path`.
fn swap_into<P: LinkProgram>(program: &mut P, path: &Path) -> Result<FdLink, BoxError>
where
    FdLink: TryFrom<P::Link, Error = LinkError>,
{
    let pinned = PinnedLink::from_pin(path)?;
    let link = P::Link::try_from(FdLink::from(pinned))?;
    let id = program.attach_to_link(link)?;
    let link = program.take_link(id)?;
    Ok(FdLink::try_from(link)?)
}

/// Pins `program`'s new link `id` (attached to `interface`) at `path`.
pub(super) fn pin_new<P: LinkProgram>(
    program: &mut P,
    id: P::Id,
    interface: &str,
    path: &Path,
) -> Result<FdLink, KernelError>
where
    FdLink: TryFrom<P::Link, Error = LinkError>,
{
    let failed = |source: BoxError| KernelError::PinLink {
        interface: interface.to_owned(),
        path: path.display().to_string(),
        source,
    };
    let link = program.take_link(id).map_err(|e| failed(Box::new(e)))?;
    let link = FdLink::try_from(link).map_err(|e| failed(Box::new(e)))?;
    let pinned = link.pin(path).map_err(|e| failed(Box::new(e)))?;
    Ok(pinned.into())
}
