//! Empty library target: lets lb-userspace's build script depend on this crate
//! so cargo rebuilds the agent when the datapath changes.
#![no_std]
