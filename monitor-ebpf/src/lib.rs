//! Host-side stub: the programs are in the `monitor` binary target, built for bpfel by
//! monitor's build.rs. This empty library lets monitor list the crate as a build dependency,
//! so cargo rebuilds it when the eBPF sources change.
#![no_std]
