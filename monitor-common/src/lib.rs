//! Types that cross the kernel/user boundary: ring-buffer events, map keys and values, and the
//! names of the globals the loader fills in.
//!
//! Every type here is `#[repr(C)]`, `Copy`, has explicit padding fields (uninitialised padding
//! would leak kernel memory and make decoding depend on garbage) and a const size assertion, so a
//! change of layout on one side fails the build instead of corrupting the other side.
#![no_std]

pub mod event;
pub mod maps;

pub use event::*;
pub use maps::*;
