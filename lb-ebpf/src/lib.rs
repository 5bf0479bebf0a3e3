//! The parts of the datapath that are plain arithmetic, built for the host too
//! so they are unit-tested there. The program itself is `main.rs`.
#![cfg_attr(not(test), no_std)]

pub mod csum;
