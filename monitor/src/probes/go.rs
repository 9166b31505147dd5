//! Go executables: finding a function in the runtime's own symbol table, `.gopclntab`, which a
//! Go binary keeps even when stripped (`-ldflags=-s -w` drops `.symtab` and DWARF, not this:
//! the runtime needs it for stack traces), and where to probe it.
//!
//! The table's layout since Go 1.18 (runtime/symtab.go, `pcHeader`): a header with the magic
//! number, the pointer size, the function count, the text start and the offsets of the name table
//! and the function table; the function table holds `(entry offset, func offset)` pairs, each
//! `_func` starts with its entry offset and the offset of its name. Older layouts (Go <= 1.17)
//! are refused: Go 1.16 passes arguments on the stack, and 1.17 is long out of support.

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess, Register};

/// `pcHeader.magic` of Go 1.18-1.19 and of Go 1.20 and later.
const MAGIC_GO118: u32 = 0xffff_fff0;
const MAGIC_GO120: u32 = 0xffff_fff1;
/// Go 1.16-1.17 and 1.2-1.15: recognised only to say why they are not supported.
const MAGIC_OLD: [u32; 2] = [0xffff_fffa, 0xffff_fffb];
/// Functions looked through at most (a large Go binary has ~100,000).
const MAX_FUNCTIONS: usize = 4_000_000;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum GoTableError {
    #[error(".gopclntab too short or malformed: {0}")]
    Malformed(&'static str),
    #[error("Go older than 1.18 (pclntab magic {0:#x}): its calling convention is not supported")]
    TooOld(u32),
    #[error("not a Go pclntab (magic {0:#x})")]
    NotGo(u32),
    #[error("{0}-byte pointers: only 64-bit Go executables are supported")]
    PointerSize(u8),
}

/// A function's code: `[entry, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoFunction {
    pub entry: u64,
    /// Where the next function starts (the table is sorted by entry).
    pub end: u64,
}

/// The functions named `wanted` in the `.gopclntab` section `table`; `text` is the `.text`
/// section's address, used when the header's text start is left for the loader to relocate
/// (position-independent executables).
pub fn find_functions(table: &[u8], text: u64, wanted: &[&str]) -> Result<Vec<Option<GoFunction>>, GoTableError> {
    let u32_at = |at: usize| -> Option<u32> { Some(u32::from_le_bytes(table.get(at..at + 4)?.try_into().ok()?)) };
    let u64_at = |at: usize| -> Option<u64> { Some(u64::from_le_bytes(table.get(at..at + 8)?.try_into().ok()?)) };
    let magic = u32_at(0).ok_or(GoTableError::Malformed("no header"))?;
    if MAGIC_OLD.contains(&magic) {
        return Err(GoTableError::TooOld(magic));
    }
    if magic != MAGIC_GO118 && magic != MAGIC_GO120 {
        return Err(GoTableError::NotGo(magic));
    }
    let ptr_size = *table.get(7).ok_or(GoTableError::Malformed("no header"))?;
    if ptr_size != 8 {
        return Err(GoTableError::PointerSize(ptr_size));
    }
    let field = |n: usize| u64_at(8 + 8 * n).ok_or(GoTableError::Malformed("header cut short"));
    let nfunc = field(0)? as usize;
    let text_start = match field(2)? {
        0 => text,
        start => start,
    };
    let names = field(3)? as usize;
    let functab = field(7)? as usize;
    if nfunc > MAX_FUNCTIONS {
        return Err(GoTableError::Malformed("function count"));
    }
    let mut found = vec![None; wanted.len()];
    for i in 0..nfunc {
        let entry = functab + i * 8;
        let (Some(entry_off), Some(func_off)) = (u32_at(entry), u32_at(entry + 4)) else {
            return Err(GoTableError::Malformed("function table cut short"));
        };
        let func = functab + func_off as usize;
        let name_off = u32_at(func + 4).ok_or(GoTableError::Malformed("function record cut short"))? as usize;
        let name = c_str(table, names + name_off).ok_or(GoTableError::Malformed("function name"))?;
        if let Some(slot) = wanted.iter().position(|w| w.as_bytes() == name) {
            // The table has nfunc + 1 entries: the last one marks the end of the text.
            let next = u32_at(entry + 8).ok_or(GoTableError::Malformed("function table cut short"))?;
            let (entry, end) = (text_start + entry_off as u64, text_start + next as u64);
            if end <= entry {
                return Err(GoTableError::Malformed("function table out of order"));
            }
            found[slot] = Some(GoFunction { entry, end });
            if found.iter().all(Option::is_some) {
                break;
            }
        }
    }
    Ok(found)
}

fn c_str(table: &[u8], at: usize) -> Option<&[u8]> {
    let rest = table.get(at..)?;
    let len = rest.iter().take(1024).position(|b| *b == 0)?;
    Some(&rest[..len])
}

/// The offsets (past `address`) of the `ret` instructions in a function's code: where a probe
/// sees the results of a Go function without a uretprobe (which breaks Go: it moves stacks and
/// checks return addresses).
pub fn returns(code: &[u8], address: u64) -> Vec<u64> {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    let mut found = Vec::new();
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        if instruction.mnemonic() == iced_x86::Mnemonic::Ret {
            found.push(instruction.ip() - address);
        }
    }
    found
}

/// The instruction past a Go function's stack check (`cmp rsp, [r14+16]; jbe morestack`, or
/// with `lea r12, [rsp-N]` first for large frames), as bytes past the entry. A call that must
/// grow its stack takes the branch and runs the function again from its entry: a probe on the
/// entry would fire twice for it, one past the check fires once. `None` when the function does
/// not start with a stack check (the probe then goes on the entry), or when an instruction before
/// it writes one of the argument registers `preserved`.
pub fn past_stack_check(code: &[u8], address: u64, preserved: &[Register]) -> Option<u64> {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut factory = InstructionInfoFactory::new();
    let mut instruction = Instruction::default();
    let mut checked = false;
    for _ in 0..4 {
        if !decoder.can_decode() {
            return None;
        }
        decoder.decode_out(&mut instruction);
        if instruction.is_invalid() {
            return None;
        }
        if checked {
            if instruction.flow_control() != FlowControl::ConditionalBranch {
                return None;
            }
            return Some(instruction.next_ip() - address);
        }
        let info = factory.info(&instruction);
        let writes_argument = info.used_registers().iter().any(|used| {
            preserved.contains(&used.register().full_register())
                && matches!(
                    used.access(),
                    OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
                )
        });
        if writes_argument || instruction.flow_control() != FlowControl::Next {
            return None;
        }
        // The stack bound lives in the goroutine, `g`, which the register ABI keeps in R14.
        checked = instruction.mnemonic() == iced_x86::Mnemonic::Cmp && instruction.memory_base() == Register::R14;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pclntab of the Go 1.18 layout with the given functions (name, entry offset).
    fn table(magic: u32, text_start: u64, funcs: &[(&str, u32)]) -> Vec<u8> {
        let header_len = 8 + 8 * 8;
        let mut names = Vec::new();
        let mut name_offs = Vec::new();
        for (name, _) in funcs {
            name_offs.push(names.len() as u32);
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        let names_at = header_len;
        let functab_at = names_at + names.len();
        let records_at = (funcs.len() + 1) * 8;
        let mut t = Vec::new();
        t.extend_from_slice(&magic.to_le_bytes());
        t.extend_from_slice(&[0, 0, 1, 8]);
        for v in [funcs.len() as u64, 0, text_start, names_at as u64, 0, 0, 0, functab_at as u64] {
            t.extend_from_slice(&v.to_le_bytes());
        }
        t.extend_from_slice(&names);
        for (i, (_, entry)) in funcs.iter().enumerate() {
            t.extend_from_slice(&entry.to_le_bytes());
            t.extend_from_slice(&((records_at + i * 8) as u32).to_le_bytes());
        }
        // The end entry: past the last function.
        let last = funcs.last().map_or(0, |(_, e)| *e);
        t.extend_from_slice(&(last + 0x1000).to_le_bytes());
        t.extend_from_slice(&[0; 4]);
        for ((_, entry), name_off) in funcs.iter().zip(&name_offs) {
            t.extend_from_slice(&entry.to_le_bytes());
            t.extend_from_slice(&name_off.to_le_bytes());
        }
        t
    }

    #[test]
    fn finds_functions_by_name_relative_to_the_text_start() {
        let funcs = [("main.main", 0x100), ("crypto/tls.(*Conn).Write", 0x2340), ("crypto/tls.(*Conn).Read", 0x9000)];
        let t = table(MAGIC_GO120, 0x401000, &funcs);
        let found = find_functions(&t, 0, &["crypto/tls.(*Conn).Write", "net.(*Resolver).lookupIP"]).unwrap();
        assert_eq!(found, [Some(GoFunction { entry: 0x403340, end: 0x40a000 }), None]);
        // A text start left at 0 (PIE) falls back to the .text section's address.
        let t = table(MAGIC_GO118, 0, &[("main.main", 0x100), ("crypto/tls.(*Conn).Read", 0x9000), ("z", 0x9400)]);
        let found = find_functions(&t, 0x1000, &["crypto/tls.(*Conn).Read"]).unwrap();
        assert_eq!(found, [Some(GoFunction { entry: 0xa000, end: 0xa400 })]);
    }

    #[test]
    fn old_foreign_and_damaged_tables_are_errors_not_panics() {
        let funcs = [("crypto/tls.(*Conn).Write", 0x10)];
        assert_eq!(find_functions(&table(0xffff_fffa, 1, &funcs), 0, &["x"]), Err(GoTableError::TooOld(0xffff_fffa)));
        assert_eq!(find_functions(b"\x7fELF....", 0, &["x"]), Err(GoTableError::NotGo(0x464c457f)));
        let t = table(MAGIC_GO120, 0x401000, &funcs);
        for cut in 0..t.len() {
            let _ = find_functions(&t[..cut], 0, &["crypto/tls.(*Conn).Write"]);
        }
        let mut huge = t.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(find_functions(&huge, 0, &["x"]).is_err());
    }

    #[test]
    fn returns_are_found_wherever_they_are() {
        // push rbp; ret; mov eax, 1; ret; nop
        let code = [0x55, 0xc3, 0xb8, 1, 0, 0, 0, 0xc3, 0x90];
        assert_eq!(returns(&code, 0x5000), [1, 7]);
    }

    const GO_ARGS: &[Register] = &[Register::RAX, Register::RBX, Register::RCX];

    #[test]
    fn the_probe_goes_past_the_stack_check() {
        // Go 1.19 crypto/tls.(*Conn).Write: cmp rsp, [r14+0x10]; jbe rel32; push rbp; mov rbp, rsp
        let code = [0x49, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0x10, 0x02, 0, 0, 0x55, 0x48, 0x89, 0xe5];
        assert_eq!(past_stack_check(&code, 0x5000, GO_ARGS), Some(10));
        // A large frame: lea r12, [rsp-0x1000]; cmp r12, [r14+0x10]; jbe rel8; push rbp
        let code = [0x4c, 0x8d, 0xa4, 0x24, 0x00, 0xf0, 0xff, 0xff, 0x4d, 0x3b, 0x66, 0x10, 0x76, 0x20, 0x55];
        assert_eq!(past_stack_check(&code, 0x5000, GO_ARGS), Some(14));
        // No stack check (a NOSPLIT function): push rbp; ...
        assert_eq!(past_stack_check(&[0x55, 0x48, 0x89, 0xe5], 0x5000, GO_ARGS), None);
        // An argument register written first: mov rax, rbx; cmp rsp, [r14+0x10]; jbe
        let code = [0x48, 0x89, 0xd8, 0x49, 0x3b, 0x66, 0x10, 0x76, 0x20];
        assert_eq!(past_stack_check(&code, 0x5000, GO_ARGS), None);
    }
}
