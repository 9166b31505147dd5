//! The kernel side of monitor: process probes that attribute every task to its delegation
//! session. One module per hook family under `hooks/`; every map is declared in `maps.rs`.
#![no_std]
#![no_main]

mod hooks;
mod kernel;
mod maps;
mod session;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // eBPF programs cannot unwind; the verifier rejects any path that reaches here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
