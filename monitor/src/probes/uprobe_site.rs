//! Where in a function to place an entry uprobe so that a hit costs one breakpoint trap and no
//! single-step.
//!
//! A uprobe replaces an instruction with `int3`. On a hit, the kernel runs the probe and then
//! has to execute the displaced instruction: a few kinds (direct call, jmp and jcc, `push reg`)
//! it emulates; every other one it single-steps out of line, which takes a second exception
//! (#DB). On the virtual machines this agent was measured on, that single-step is most of a
//! uprobe's cost: an HTTPS request loop with uprobes on the first instructions of `SSL_write` and
//! `SSL_write_ex` (`sub rsp` in Debian's OpenSSL 3) ran 15% slower; with the same uprobes on the
//! first emulated instruction a few bytes further in, 3%.
//!
//! So the probe goes on the first emulated instruction of the function's straight-line prologue,
//! when the instructions before it cannot branch away and leave the argument registers the
//! program reads untouched, and when nothing in the function jumps back into that stretch (the
//! probe would fire twice). Otherwise it stays on the entry. Only for entry uprobes: a
//! uretprobe must sit on the entry, where the return address is on top of the stack.

use std::path::Path;

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess, Register};
use object::{Object, ObjectSection, ObjectSymbol};

/// Instructions of the prologue looked at before giving up on finding an emulated one.
const PROLOGUE_INSTRUCTIONS: usize = 16;
/// Bytes of a function decoded to look for branches back into its prologue.
const MAX_FUNCTION_BYTES: u64 = 64 * 1024;

/// The argument registers of the x86-64 System V calling convention, in order.
const ARG_REGISTERS: [Register; 6] =
    [Register::RDI, Register::RSI, Register::RDX, Register::RCX, Register::R8, Register::R9];

/// Where a uprobe goes: an offset in the library file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Site {
    /// Offset of the probed instruction in the file (what the kernel's uprobe takes).
    pub file_offset: u64,
    /// Bytes past the function's entry.
    pub past_entry: u64,
    /// Whether the kernel emulates the probed instruction (no single-step on a hit).
    pub emulated: bool,
}

/// The site for an entry uprobe on `symbol` of the ELF file `library`, for a program that reads
/// the first `args` argument registers.
pub fn entry_site(library: &Path, symbol: &str, args: usize) -> Result<Site, String> {
    let data = std::fs::read(library).map_err(|e| format!("{}: {e}", library.display()))?;
    let file = object::File::parse(&*data).map_err(|e| format!("{}: {e}", library.display()))?;
    if file.architecture() != object::Architecture::X86_64 {
        // The instructions are decoded as x86-64 machine code below.
        return Err(format!("{}: {:?} code is not supported", library.display(), file.architecture()));
    }
    let found = file
        .dynamic_symbols()
        .chain(file.symbols())
        .find(|s| s.is_definition() && s.name() == Ok(symbol))
        .ok_or_else(|| format!("{}: no symbol {symbol}", library.display()))?;
    let (address, size) = (found.address(), found.size());
    let section = file
        .sections()
        .find(|s| s.address() <= address && address < s.address() + s.size())
        .ok_or_else(|| format!("{symbol} at {address:#x} is in no section"))?;
    let (section_offset, _) = section.file_range().ok_or_else(|| format!("{symbol}: section without file data"))?;
    let entry_offset = section_offset + (address - section.address());
    let len = size.clamp(1, MAX_FUNCTION_BYTES) as usize;
    let code = data
        .get(entry_offset as usize..)
        .map(|rest| &rest[..len.min(rest.len())])
        .ok_or_else(|| format!("{symbol}: code outside the file"))?;
    let preserved = &ARG_REGISTERS[..args.min(ARG_REGISTERS.len())];
    let past_entry = match probe_point(code, address, preserved) {
        Some(at) => at,
        None => return Ok(Site { file_offset: entry_offset, past_entry: 0, emulated: is_emulated(code) }),
    };
    Ok(Site { file_offset: entry_offset + past_entry, past_entry, emulated: true })
}

/// Bytes past the entry of the first emulated instruction that every call reaches with
/// `preserved` intact, if there is one. `code` is the function's machine code at `address`.
pub(super) fn probe_point(code: &[u8], address: u64, preserved: &[Register]) -> Option<u64> {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut factory = InstructionInfoFactory::new();
    let mut instruction = Instruction::default();
    let mut chosen = None;
    for _ in 0..PROLOGUE_INSTRUCTIONS {
        if !decoder.can_decode() {
            break;
        }
        decoder.decode_out(&mut instruction);
        if instruction.is_invalid() {
            return None;
        }
        let at = instruction.ip() - address;
        if is_emulated(&code[at as usize..]) {
            chosen = Some(at);
            break;
        }
        if instruction.flow_control() != FlowControl::Next || writes_any(&mut factory, &instruction, preserved) {
            return None;
        }
    }
    let chosen = chosen.filter(|at| *at > 0)?;
    // Nothing may jump into (entry, chosen]: the probe would fire again, mid-call.
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        let target = instruction.near_branch_target();
        if target > address && target <= address + chosen {
            return None;
        }
    }
    Some(chosen)
}

fn writes_any(factory: &mut InstructionInfoFactory, instruction: &Instruction, registers: &[Register]) -> bool {
    factory.info(instruction).used_registers().iter().any(|used| {
        registers.contains(&used.register().full_register())
            && matches!(
                used.access(),
                OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
            )
    })
}

/// Whether the instruction at the start of `code` is one the kernel's x86 uprobes emulate rather
/// than single-step (arch/x86/kernel/uprobes.c: branch_setup_xol_ops, push_setup_xol_ops), in
/// the plain encodings only: no prefixes but `push`'s REX.B.
fn is_emulated(code: &[u8]) -> bool {
    match code {
        // call rel32, jmp rel32, jmp rel8, jcc rel8
        [0xe8 | 0xe9 | 0xeb, ..] | [0x70..=0x7f, ..] => true,
        // jcc rel32
        [0x0f, 0x80..=0x8f, ..] => true,
        // push r64, push r8-r15
        [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..] => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDRESS: u64 = 0x35980;
    const PRESERVED: &[Register] = &[Register::RDI, Register::RSI, Register::RDX];

    #[test]
    fn skips_a_stack_setup_to_the_first_conditional_branch() {
        // Debian's OpenSSL 3 SSL_write: sub rsp; mov rax, fs:0x28; mov [rsp+8], rax;
        // xor eax, eax; test edx, edx; js +0x2f
        let code = [
            0x48, 0x83, 0xec, 0x18, 0x64, 0x48, 0x8b, 0x04, 0x25, 0x28, 0, 0, 0, 0x48, 0x89, 0x44, 0x24, 0x08, 0x31,
            0xc0, 0x85, 0xd2, 0x78, 0x2f, 0xc3,
        ];
        assert_eq!(probe_point(&code, ADDRESS, PRESERVED), Some(0x16));
    }

    #[test]
    fn an_emulated_entry_needs_no_move() {
        // push rbx; mov rbx, rdx; ret
        assert_eq!(probe_point(&[0x53, 0x48, 0x89, 0xd3, 0xc3], ADDRESS, PRESERVED), None);
        assert!(is_emulated(&[0x53]));
        assert!(is_emulated(&[0x41, 0x57]));
    }

    #[test]
    fn stays_on_the_entry_when_an_argument_register_changes_first() {
        // mov rsi, rdi; call rel32
        let code = [0x48, 0x89, 0xfe, 0xe8, 0, 0, 0, 0];
        assert_eq!(probe_point(&code, ADDRESS, PRESERVED), None);
        // The same is fine when only rdi is read.
        assert_eq!(probe_point(&code, ADDRESS, &[Register::RDI]), Some(3));
    }

    #[test]
    fn stays_on_the_entry_when_a_branch_targets_the_prologue() {
        // sub rsp, 8; call rel32; jmp back to the call
        let code = [0x48, 0x83, 0xec, 0x08, 0xe8, 0, 0, 0, 0, 0xeb, 0xf9];
        assert_eq!(probe_point(&code, ADDRESS, PRESERVED), None);
    }

    #[test]
    fn stays_on_the_entry_past_a_return_or_an_indirect_jump() {
        // sub rsp, 8; ret; call rel32
        assert_eq!(probe_point(&[0x48, 0x83, 0xec, 0x08, 0xc3, 0xe8, 0, 0, 0, 0], ADDRESS, PRESERVED), None);
        // sub rsp, 8; jmp rax; call rel32
        assert_eq!(probe_point(&[0x48, 0x83, 0xec, 0x08, 0xff, 0xe0, 0xe8, 0, 0, 0, 0], ADDRESS, PRESERVED), None);
    }

    #[test]
    fn finds_the_real_libssl_functions_when_installed() {
        let libssl =
            super::super::load::library_path("libssl.so.3").expect("libssl.so.3 (cargo xtask setup installs OpenSSL)");
        for symbol in ["SSL_write", "SSL_write_ex"] {
            let site = entry_site(&libssl, symbol, 3).unwrap();
            assert!(site.emulated && site.past_entry < 64, "{symbol}: {site:?}");
        }
    }
}
