//! TLS code linked into executables: Go's `crypto/tls` (every Go program: gh, kubectl,
//! terraform, vault, most cloud CLIs) and OpenSSL or BoringSSL linked statically (node, bun,
//! envoy, some curl builds). Shared libraries are probed once per library file; these live in
//! each executable, so each executable is looked at when it is first exec'd on the host (the exec
//! probe reports each file once, hooks/process.rs) and its write function probed, for every
//! process that runs it.
//!
//! The file is read through its descriptor (`/proc/PID/exe` while the process lives, so another
//! mount namespace or a deleted file is no obstacle), only the parts the check needs: the
//! section headers, then `.gopclntab` for a Go binary or the symbol tables for the others. A
//! file that is neither costs that one section check, and the answer is kept per inode.

use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use iced_x86::Register;
use object::{Object, ObjectSection, ObjectSymbol};

use super::go;

/// The Go function whose plaintext argument is what a Go TLS client sends.
pub const GO_TLS_WRITE: &str = "crypto/tls.(*Conn).Write";
/// The Go function whose results are what a Go TLS client receives (token responses).
pub const GO_TLS_READ: &str = "crypto/tls.(*Conn).Read";
/// Bytes of a function decoded to find its returns.
const MAX_FUNCTION_BYTES: u64 = 64 * 1024;
/// Go's register ABI on amd64: the receiver, then the slice's pointer and length.
const GO_WRITE_ARGS: [Register; 3] = [Register::RAX, Register::RBX, Register::RCX];
/// Symbol tables larger than this are not searched for a static OpenSSL (a debug build of a big
/// C++ program): the dynamic symbols, where such builds export it, still are.
const MAX_SYMTAB_BYTES: u64 = 32 * 1024 * 1024;

/// A probe to attach to an executable: which program, at which file offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutableProbe {
    pub program: &'static str,
    pub symbol: &'static str,
    pub file_offset: u64,
}

/// What an executable holds, as far as the TLS probes care.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inspection {
    pub probes: Vec<ExecutableProbe>,
    /// Why TLS code that was found cannot be probed (an old Go, say), for the log.
    pub unsupported: Option<String>,
}

/// Looks at the executable behind `file` for TLS write functions to probe.
pub fn inspect(file: &File) -> Result<Inspection, String> {
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).map_err(|e| format!("not an ELF file: {e}"))?;
    if elf.architecture() != object::Architecture::X86_64 {
        // The probe sites are decoded as x86-64 machine code (uprobe_site.rs, go.rs).
        return Ok(Inspection {
            unsupported: Some(format!("{:?} executables are not supported", elf.architecture())),
            ..Default::default()
        });
    }
    if let Some(table) = elf.section_by_name(".gopclntab") {
        return inspect_go(&elf, file, &table);
    }
    let mut inspection = Inspection::default();
    for (program, symbol) in [("ssl_write", "SSL_write"), ("ssl_write_ex", "SSL_write_ex")] {
        if let Some(address) = defined_symbol(&elf, symbol) {
            let file_offset = file_offset(&elf, address)?;
            inspection.probes.push(ExecutableProbe { program, symbol, file_offset });
        }
    }
    Ok(inspection)
}

/// Whether a shared library of this file name is one the library probes (see `PROBES`) attach
/// to: OpenSSL 3's libssl, GnuTLS, the C library.
pub fn is_probed_library(name: &str) -> bool {
    library_programs(name).next().is_some()
}

/// The C library, by its file name (`libc.so.6`, or `libc-2.31.so` on older glibc).
pub fn is_libc(name: &str) -> bool {
    name.starts_with("libc.so") || name.starts_with("libc-")
}

/// The library probes for a library of this file name: program, function, and the arguments an
/// entry probe reads (none for a return probe or a libc one, which stay on the entry).
fn library_programs(name: &str) -> impl Iterator<Item = (&'static str, &'static str, Option<usize>)> + '_ {
    use super::AttachPoint;
    super::PROBES.iter().filter_map(move |spec| match spec.attach {
        AttachPoint::Library { file, symbol, args } if name.starts_with(file) => {
            Some((spec.program, symbol, Some(args)))
        }
        AttachPoint::LibraryReturn { file, symbol } if name.starts_with(file) => Some((spec.program, symbol, None)),
        AttachPoint::Libc { symbol } if is_libc(name) => Some((spec.program, symbol, None)),
        _ => None,
    })
}

/// The probes for a shared library (`name` is its file name) that a process maps from another
/// file than the one the library probes took at start: a container image's own libssl or libc,
/// a copy loaded through LD_LIBRARY_PATH. The same programs, on the same functions of this file.
pub fn inspect_library(file: &File, name: &str) -> Result<Inspection, String> {
    use std::os::fd::AsRawFd as _;
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).map_err(|e| format!("not an ELF file: {e}"))?;
    if elf.architecture() != object::Architecture::X86_64 {
        return Ok(Inspection {
            unsupported: Some(format!("{:?} libraries are not supported", elf.architecture())),
            ..Default::default()
        });
    }
    // Read again whole by the site finder, through the descriptor (the file may be in another
    // mount namespace, or deleted).
    let by_descriptor = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let mut inspection = Inspection::default();
    for (program, symbol, args) in library_programs(name) {
        let Some(address) = defined_symbol(&elf, symbol) else { continue };
        let entry = file_offset(&elf, address)?;
        let file_offset = match args {
            Some(args) => super::uprobe_site::entry_site(&by_descriptor, symbol, args).map_or(entry, |s| s.file_offset),
            None => entry,
        };
        inspection.probes.push(ExecutableProbe { program, symbol, file_offset });
    }
    Ok(inspection)
}

fn inspect_go<'d, R: object::ReadRef<'d>>(
    elf: &object::File<'d, R>,
    file: &File,
    table: &object::Section<'d, '_, R>,
) -> Result<Inspection, String> {
    let data = table.data().map_err(|e| format!(".gopclntab: {e}"))?;
    let text = elf.section_by_name(".text").map_or(0, |s| s.address());
    let (write, read) = match go::find_functions(data, text, &[GO_TLS_WRITE, GO_TLS_READ]) {
        Ok(found) => (found[0], found[1]),
        Err(e) => return Ok(Inspection { unsupported: Some(e.to_string()), ..Default::default() }),
    };
    // A Go program without crypto/tls (the linker drops what is not used).
    let Some(write) = write else { return Ok(Inspection::default()) };
    let mut probes = vec![go_entry_probe(elf, file, write, "go_tls_write", GO_TLS_WRITE)?];
    if let Some(read) = read {
        // Its results at each `ret`: Go breaks under uretprobes (it moves stacks).
        probes.push(go_entry_probe(elf, file, read, "go_tls_read", GO_TLS_READ)?);
        let entry = file_offset(elf, read.entry)?;
        let len = (read.end - read.entry).min(MAX_FUNCTION_BYTES);
        let code = code_range(elf, file, read.entry, len)?;
        for at in go::returns(&code, read.entry) {
            probes.push(ExecutableProbe { program: "go_tls_read_ret", symbol: GO_TLS_READ, file_offset: entry + at });
        }
    }
    Ok(Inspection { probes, unsupported: None })
}

/// An entry probe on a Go function, past its stack check, and further on the first instruction
/// the kernel emulates if the frame setup before it leaves the arguments alone (see
/// uprobe_site.rs: Go's `sub rsp, N` right after the check would be single-stepped, measured as
/// most of the cost of a Go client's request).
fn go_entry_probe<'d, R: object::ReadRef<'d>>(
    elf: &object::File<'d, R>,
    file: &File,
    function: go::GoFunction,
    program: &'static str,
    symbol: &'static str,
) -> Result<ExecutableProbe, String> {
    let entry = file_offset(elf, function.entry)?;
    let code = code_range(elf, file, function.entry, (function.end - function.entry).min(MAX_FUNCTION_BYTES))?;
    let mut past = go::past_stack_check(&code, function.entry, &GO_WRITE_ARGS).unwrap_or(0);
    if past > 0 {
        let rest = &code[(past as usize).min(code.len())..];
        past += super::uprobe_site::probe_point(rest, function.entry + past, &GO_WRITE_ARGS).unwrap_or(0);
    }
    Ok(ExecutableProbe { program, symbol, file_offset: entry + past })
}

/// The address of a function the executable itself defines (not one it imports).
fn defined_symbol<'d, R: object::ReadRef<'d>>(elf: &object::File<'d, R>, name: &str) -> Option<u64> {
    let defined = |s: &object::Symbol<'d, '_, R>| s.is_definition() && s.name() == Ok(name) && s.address() != 0;
    if let Some(s) = elf.dynamic_symbols().find(defined) {
        return Some(s.address());
    }
    let symtab_size = elf.section_by_name(".symtab").map_or(0, |s| s.size());
    if symtab_size > MAX_SYMTAB_BYTES {
        return None;
    }
    elf.symbols().find(defined).map(|s| s.address())
}

fn file_offset<'d, R: object::ReadRef<'d>>(elf: &object::File<'d, R>, address: u64) -> Result<u64, String> {
    let section = elf
        .sections()
        .find(|s| s.address() <= address && address < s.address() + s.size())
        .ok_or_else(|| format!("{address:#x} is in no section"))?;
    let (offset, _) = section.file_range().ok_or_else(|| format!("{address:#x}: section without file data"))?;
    Ok(offset + (address - section.address()))
}

/// Up to `len` bytes of code at `address`, read from the file itself: through the ELF reader's
/// cache it would be the whole section (a Go program's `.text` is tens of MB).
fn code_range<'d, R: object::ReadRef<'d>>(
    elf: &object::File<'d, R>,
    file: &File,
    address: u64,
    len: u64,
) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt as _;
    let section = elf
        .sections()
        .find(|s| s.address() <= address && address < s.address() + s.size())
        .ok_or_else(|| format!("{address:#x} is in no section"))?;
    let (offset, size) = section.file_range().ok_or_else(|| format!("{address:#x}: code not in the file"))?;
    let within = address - section.address();
    let len = len.min(size.saturating_sub(within));
    let mut code = vec![0; len as usize];
    file.read_exact_at(&mut code, offset + within).map_err(|e| format!("{address:#x}: {e}"))?;
    Ok(code)
}

/// Where executables are looked for at start, before they run: the tools a delegated actor is
/// given live here, and a probe attached in advance cannot lose a fast first request.
pub const DEFAULT_DIRS: &[&str] = &["/usr/local/bin", "/usr/bin", "/usr/sbin", "/bin", "/sbin", "/opt", "/snap/bin"];
/// Directory levels walked below each of them (/opt/VENDOR/TOOL/bin).
const SCAN_DEPTH: usize = 3;
/// Directory entries looked at, over all directories.
const SCAN_BUDGET: usize = 50_000;
/// Smaller files are not looked at: a Go program or a static OpenSSL is larger.
const MIN_SIZE: u64 = 1 << 20;

/// The executable files under `dirs` worth looking at, once each (symlinks resolved).
pub fn candidates(dirs: &[PathBuf]) -> Vec<(PathBuf, FileId)> {
    let mut found = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut budget = SCAN_BUDGET;
    for dir in dirs {
        walk(dir, 0, &mut budget, &mut seen, &mut found);
    }
    found
}

fn walk(
    dir: &Path,
    depth: usize,
    budget: &mut usize,
    seen: &mut std::collections::HashSet<FileId>,
    found: &mut Vec<(PathBuf, FileId)>,
) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let path = entry.path();
        // Followed: /usr/bin/go is a link into /usr/lib/go-*/bin.
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if meta.is_dir() {
            if depth < SCAN_DEPTH && !entry.file_type().is_ok_and(|t| t.is_symlink()) {
                walk(&path, depth + 1, budget, seen, found);
            }
            continue;
        }
        let executable = meta.mode() & 0o111 != 0;
        if !meta.is_file() || !executable || meta.len() < MIN_SIZE {
            continue;
        }
        let id = FileId { dev: crate::host::kernel_dev(meta.dev()), ino: meta.ino() };
        if seen.insert(id) {
            found.push((path, id));
        }
    }
}

/// An executable file as the exec probe reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    /// `sb->s_dev` in the kernel's encoding.
    pub dev: u32,
    pub ino: u64,
}

/// Opens the executable a process runs: through `/proc/PID/exe` while the process lives, else by
/// the path it was exec'd with, if that is absolute and still the same file (inode).
pub fn open(pid: u32, filename: &str, id: FileId) -> Option<(File, PathBuf)> {
    let same = |f: &File| f.metadata().is_ok_and(|m| m.ino() == id.ino);
    let proc_exe = PathBuf::from(format!("/proc/{pid}/exe"));
    if let Ok(f) = File::open(&proc_exe) {
        if same(&f) {
            return Some((f, proc_exe));
        }
    }
    let path = Path::new(filename);
    if path.is_absolute() {
        if let Ok(f) = File::open(path) {
            if same(&f) {
                return Some((f, path.to_path_buf()));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_c_program_without_tls_has_nothing_to_probe() {
        let f = File::open("/bin/true").unwrap();
        assert_eq!(inspect(&f).unwrap(), Inspection::default());
    }

    #[test]
    fn a_program_that_only_imports_ssl_write_is_left_to_the_library_probe() {
        // curl imports SSL_write from libssl (undefined in its own tables) where it is installed;
        // any dynamically linked program that is not curl shows the same.
        let path = ["/usr/bin/curl", "/bin/ls"].into_iter().find(|p| Path::new(p).exists()).unwrap();
        let f = File::open(path).unwrap();
        assert!(inspect(&f).unwrap().probes.is_empty());
    }

    #[test]
    fn a_copy_of_libssl_gets_the_library_probes_on_its_own_functions() {
        let host = Path::new("/usr/lib/x86_64-linux-gnu/libssl.so.3");
        let f = File::open(host).unwrap();
        let inspection = inspect_library(&f, "libssl.so.3").unwrap();
        let programs: Vec<_> = inspection.probes.iter().map(|p| p.program).collect();
        for program in ["ssl_write", "ssl_write_ex", "ssl_read", "ssl_read_ret", "ssl_read_ex", "ssl_read_ex_ret"] {
            assert!(programs.contains(&program), "{program} in {programs:?}");
        }
        // The same places the probes take on the host's file at start.
        for p in &inspection.probes {
            let expected = match p.program {
                "ssl_write" | "ssl_write_ex" => {
                    super::super::uprobe_site::entry_site(host, p.symbol, 3).unwrap().file_offset
                }
                _ => continue,
            };
            assert_eq!(p.file_offset, expected, "{}", p.program);
        }
        let libc = File::open("/usr/lib/x86_64-linux-gnu/libc.so.6").unwrap();
        let programs: Vec<_> = inspect_library(&libc, "libc.so.6").unwrap().probes.iter().map(|p| p.program).collect();
        assert_eq!(programs, ["getaddrinfo_enter", "getaddrinfo_exit"]);
        assert!(is_probed_library("libgnutls.so.30.34.3") && !is_probed_library("libz.so.1"));
    }

    #[test]
    fn not_an_elf_file_is_an_error() {
        let f = File::open("/proc/self/cmdline").unwrap();
        assert!(inspect(&f).is_err());
    }
}
