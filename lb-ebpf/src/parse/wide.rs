//! Packet words read and written whole, at any alignment.
//!
//! Header fields are byte arrays (align 1), and LLVM's BPF backend splits
//! every access it cannot prove aligned into single bytes: reading an IPv6
//! address was 16 loads, 12 shifts and 12 ors, writing it 16 stores. The
//! kernel checks packet accesses' alignment only where unaligned access is
//! slow (not x86-64 or arm64, unless the program asks with
//! `BPF_F_STRICT_ALIGNMENT`), so one 32-bit instruction does. LLVM can be
//! told so for a whole object (`allows-misaligned-mem-access`), but then it
//! also merges stack stores into unaligned ones, which the verifier always
//! refuses: these functions say it for the packet only, in an instruction
//! the verifier checks like any other (bounds included).
//!
//! Every function takes a pointer into the packet (never the stack) that
//! the caller has checked lies, with the whole word, inside it.

use core::arch::asm;

/// `$load` and `$store` for `$ty`: one BPF_LDX / BPF_STX of `$width` bytes
/// (`$size` in the BPF assembly's spelling).
macro_rules! access {
    ($load:ident, $store:ident, $ty:ty, $width:literal, $size:literal) => {
        #[doc = concat!("The ", $width, " bytes at `at`, in memory order (as `", stringify!($ty), "::from_ne_bytes`).")]
        ///
        /// # Safety
        #[doc = concat!("`at .. at + ", $width, "` is inside the packet.")]
        #[inline(always)]
        pub unsafe fn $load(at: *const u8) -> $ty {
            let word: u64;
            // SAFETY: the caller's bytes; one load, which the verifier
            // checks against the packet's bounds.
            unsafe {
                asm!(
                    concat!("{word} = *(", $size, " *)({at} + 0)"),
                    at = in(reg) at,
                    word = lateout(reg) word,
                    options(readonly, nostack, preserves_flags, pure),
                );
            }
            word as $ty
        }

        #[doc = concat!("Writes `word` (memory order) to the ", $width, " bytes at `at`.")]
        ///
        /// # Safety
        #[doc = concat!("`at .. at + ", $width, "` is inside the packet.")]
        #[inline(always)]
        pub unsafe fn $store(at: *mut u8, word: $ty) {
            // SAFETY: the caller's bytes; one store.
            unsafe {
                asm!(
                    concat!("*(", $size, " *)({at} + 0) = {word}"),
                    at = in(reg) at,
                    word = in(reg) u64::from(word),
                    options(nostack, preserves_flags),
                );
            }
        }
    };
}

access!(load32, store32, u32, "4", "u32");
access!(load16, store16, u16, "2", "u16");

/// The 16 bytes of an IPv6 address at `at`, as four words in memory order.
///
/// # Safety
/// `at .. at + 16` is inside the packet.
#[inline(always)]
pub unsafe fn load128(at: *const u8) -> [u32; 4] {
    // SAFETY: the caller's 16 bytes.
    unsafe {
        [
            load32(at),
            load32(at.add(4)),
            load32(at.add(8)),
            load32(at.add(12)),
        ]
    }
}

/// Two 16-bit words (memory order) as the 32-bit word they make in memory.
#[inline(always)]
pub fn pair(first: u16, second: u16) -> u32 {
    let (a, b) = (first.to_ne_bytes(), second.to_ne_bytes());
    u32::from_ne_bytes([a[0], a[1], b[0], b[1]])
}

/// A 32-bit word (memory order) as the two 16-bit words it holds.
#[inline(always)]
pub fn halves(word: u32) -> (u16, u16) {
    let b = word.to_ne_bytes();
    (
        u16::from_ne_bytes([b[0], b[1]]),
        u16::from_ne_bytes([b[2], b[3]]),
    )
}
