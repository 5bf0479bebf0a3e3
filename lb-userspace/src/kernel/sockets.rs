//! The socket hooks' side of the datapath: attached to a cgroup
//! (`--cgroup`), left pinned or detached, and the records of the sockets
//! they balanced (`XLB_SOCK_REVNAT`, `XLB_SOCK_REV6`) for destroying those
//! of removed backends.

use std::net::SocketAddr;
use std::path::Path;

use aya::maps::{HashMap as BpfHashMap, MapData};
use lb_common::maps as names;
use lb_common::{SockRevNatKeyOf, SockRevNatOf, V4, V6};

use super::maps::MapFamily;
use super::{Datapath, KernelError, OpenError, SocketHooks, sock, sock_destroy};

impl Datapath {
    /// Loads the socket hooks and attaches them to the cgroup v2 directory
    /// `cgroup` (pinned, when pinning), so that connect() and sendmsg() to a
    /// service from any process in it are balanced before a packet exists.
    /// Returns the hooks attached.
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<Vec<&'static str>, KernelError> {
        if let Some(current) = &self.sockets
            && current.cgroup() == cgroup
        {
            return Ok(current.hooks());
        }
        let hooks = SocketHooks::attach(&mut self.ebpf, cgroup, self.pins.as_ref())?;
        let attached = hooks.hooks();
        if let Some(old) = self.sockets.replace(hooks) {
            // Another cgroup: the new pins replaced the old ones already.
            let _ = old.release();
        }
        Ok(attached)
    }

    /// Socket hooks a previous agent pinned that this one does not attach
    /// (no `--cgroup`): unpinned, so they detach. Returns the hooks.
    pub fn unpin_stale_sockets(&mut self) -> Result<Vec<String>, KernelError> {
        match (&self.pins, &self.sockets) {
            (Some(pins), None) => Ok(sock::unpin_stale(pins)?),
            _ => Ok(Vec::new()),
        }
    }

    /// The cgroup the socket hooks are attached to, and the hooks.
    pub fn socket_hooks(&self) -> Option<(&Path, Vec<&'static str>)> {
        self.sockets
            .as_ref()
            .map(|sockets| (sockets.cgroup(), sockets.hooks()))
    }

    /// Detaches the socket hooks (removing their pins); returns the hooks
    /// detached and a message per failure.
    pub fn detach_sockets(&mut self) -> (Vec<&'static str>, Vec<String>) {
        match self.sockets.take() {
            Some(sockets) => sockets.detach(&mut self.ebpf),
            None => (Vec::new(), Vec::new()),
        }
    }

    /// The sockets the socket hooks balanced whose backend `keeps` says is
    /// gone (`keeps(service_id, backend)`), from `XLB_SOCK_REVNAT` and
    /// `XLB_SOCK_REV6`: their records are deleted, and they are returned
    /// (cookie, backend) for `sock_destroy`. Empty without socket hooks.
    pub fn take_stale_socket_records(
        &mut self,
        keeps: impl Fn(u32, crate::model::BackendAddr) -> bool,
    ) -> Result<sock_destroy::Stale, KernelError> {
        if self.sockets.is_none() {
            return Ok(sock_destroy::Stale::new());
        }
        let mut taken = self.take_stale_of::<V4>(names::SOCK_REVNAT, &keeps)?;
        taken.append(&mut self.take_stale_of::<V6>(names::SOCK_REVNAT6, &keeps)?);
        Ok(taken)
    }

    /// `take_stale_socket_records` for one family's records (`name`).
    fn take_stale_of<F: MapFamily>(
        &mut self,
        name: &'static str,
        keeps: &impl Fn(u32, crate::model::BackendAddr) -> bool,
    ) -> Result<sock_destroy::Stale, KernelError>
    where
        F::Addr: aya::Pod,
    {
        let map = self.ebpf.map_mut(name).ok_or(OpenError::Missing { name })?;
        let mut records: BpfHashMap<&mut MapData, SockRevNatKeyOf<F>, SockRevNatOf<F>> =
            BpfHashMap::try_from(map).map_err(|source| OpenError::Kind { name, source })?;
        let backend = |key: &SockRevNatKeyOf<F>| crate::model::BackendAddr {
            address: F::from_map(&key.backend_addr_be),
            port: u16::from_be(key.backend_port_be),
        };
        let stale: Vec<SockRevNatKeyOf<F>> = records
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, record)| !keeps(record.service_id, backend(key)))
            .map(|(key, _)| key)
            .collect();
        let mut taken = sock_destroy::Stale::new();
        for key in stale {
            // Gone meanwhile (the LRU evicted it): nothing to do.
            let _ = records.remove(&key);
            let backend = backend(&key);
            taken.insert((
                key.socket_cookie,
                SocketAddr::new(backend.address, backend.port),
            ));
        }
        Ok(taken)
    }

    /// Leaves pinned socket hooks attached; returns them.
    pub fn release_sockets(&mut self) -> Vec<&'static str> {
        self.sockets
            .take()
            .map(SocketHooks::release)
            .unwrap_or_default()
    }
}
