//! Ethernet: only untagged IPv4 frames are ours.

use super::Frame;
use lb_common::Reason;
use network_types::eth::{EthHdr, EtherType};

use super::ptr_at;

#[inline(always)]
pub fn parse_eth<C: Frame>(ctx: &C) -> Result<*mut EthHdr, Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked that the whole header is inside the packet.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type != EtherType::Ipv4 as u16 {
        return Err(Reason::PassNotIpv4);
    }
    Ok(eth)
}
