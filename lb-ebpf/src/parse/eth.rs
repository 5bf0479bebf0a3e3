//! Ethernet: only untagged IPv4 frames are ours.

use super::Frame;
use lb_common::{Handoff, Reason};
use network_types::eth::{EthHdr, EtherType};

use super::ptr_at;

#[inline(always)]
pub fn parse_eth<C: Frame>(ctx: &C) -> Result<*mut EthHdr, Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked that the whole header is inside the packet.
    let (dst_addr, ether_type) = unsafe { ((*eth).dst_addr, (*eth).ether_type) };
    // Only xlb's XDP may mark a frame for the uplink's tc program.
    if Handoff::is_marked(&dst_addr) {
        return Err(Reason::DropTcHandoff);
    }
    if ether_type != EtherType::Ipv4 as u16 {
        return Err(Reason::PassNotIpv4);
    }
    Ok(eth)
}
