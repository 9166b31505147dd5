//! Struct member offsets from the running kernel's BTF, handed to the eBPF programs as globals
//! (the programs carry no CO-RE relocations, see ../shared/TOOLCHAIN.md).

use btf_rs::{Btf, Type};

use super::ProbeError;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The offsets the process hooks read. `None` where this kernel has no such member: the hook
/// then reports that field as unknown.
#[derive(Debug, Default, Clone, Copy)]
pub struct KernelOffsets {
    pub task_real_parent: Option<u32>,
    pub task_tgid: Option<u32>,
    pub task_cred: Option<u32>,
    pub task_mm: Option<u32>,
    pub task_exit_code: Option<u32>,
    pub cred_euid: Option<u32>,
    pub cred_egid: Option<u32>,
    pub mm_arg_start: Option<u32>,
    pub mm_arg_end: Option<u32>,
    pub mm_env_start: Option<u32>,
    pub mm_env_end: Option<u32>,
    pub mm_exe_file: Option<u32>,
    pub cred_cap_effective: Option<u32>,
    pub task_files: Option<u32>,
    pub files_fdt: Option<u32>,
    pub fdt_fd: Option<u32>,
    pub file_inode: Option<u32>,
    pub file_flags: Option<u32>,
    pub inode_ino: Option<u32>,
    pub inode_sb: Option<u32>,
    pub sb_dev: Option<u32>,
    pub task_signal: Option<u32>,
    pub signal_pids: Option<u32>,
    pub pid_numbers: Option<u32>,
}

impl KernelOffsets {
    pub fn from_sys() -> Result<Self, ProbeError> {
        let btf = Btf::from_file(VMLINUX_BTF).map_err(|e| ProbeError::Btf(format!("{VMLINUX_BTF}: {e}")))?;
        let member = |strukt: &str, field: &str| member_offset(&btf, strukt, field);
        Ok(Self {
            task_real_parent: member("task_struct", "real_parent"),
            task_tgid: member("task_struct", "tgid"),
            // The task's own credentials, not `cred`, which kernel code overrides for a moment
            // to act as someone else (overlayfs acts as the mounter, root, on every access to
            // a container's or a VM guest's root filesystem): a capability check read there
            // showed a process as root.
            task_cred: member("task_struct", "real_cred"),
            task_mm: member("task_struct", "mm"),
            task_exit_code: member("task_struct", "exit_code"),
            cred_euid: member("cred", "euid"),
            cred_egid: member("cred", "egid"),
            mm_arg_start: member("mm_struct", "arg_start"),
            mm_arg_end: member("mm_struct", "arg_end"),
            mm_env_start: member("mm_struct", "env_start"),
            mm_env_end: member("mm_struct", "env_end"),
            mm_exe_file: member("mm_struct", "exe_file"),
            cred_cap_effective: member("cred", "cap_effective"),
            task_files: member("task_struct", "files"),
            files_fdt: member("files_struct", "fdt"),
            fdt_fd: member("fdtable", "fd"),
            file_inode: member("file", "f_inode"),
            file_flags: member("file", "f_flags"),
            inode_ino: member("inode", "i_ino"),
            inode_sb: member("inode", "i_sb"),
            sb_dev: member("super_block", "s_dev"),
            task_signal: member("task_struct", "signal"),
            signal_pids: member("signal_struct", "pids"),
            pid_numbers: member("pid", "numbers"),
        })
    }

    /// Names of the offsets this kernel did not provide.
    pub fn missing(&self) -> Vec<&'static str> {
        let all = [
            ("task_struct.real_parent", self.task_real_parent),
            ("task_struct.tgid", self.task_tgid),
            ("task_struct.real_cred", self.task_cred),
            ("task_struct.mm", self.task_mm),
            ("task_struct.exit_code", self.task_exit_code),
            ("cred.euid", self.cred_euid),
            ("cred.egid", self.cred_egid),
            ("mm_struct.arg_start", self.mm_arg_start),
            ("mm_struct.arg_end", self.mm_arg_end),
            ("mm_struct.env_start", self.mm_env_start),
            ("mm_struct.env_end", self.mm_env_end),
            ("mm_struct.exe_file", self.mm_exe_file),
            ("cred.cap_effective", self.cred_cap_effective),
            ("task_struct.files", self.task_files),
            ("files_struct.fdt", self.files_fdt),
            ("fdtable.fd", self.fdt_fd),
            ("file.f_inode", self.file_inode),
            ("file.f_flags", self.file_flags),
            ("inode.i_ino", self.inode_ino),
            ("inode.i_sb", self.inode_sb),
            ("super_block.s_dev", self.sb_dev),
            ("task_struct.signal", self.task_signal),
            ("signal_struct.pids", self.signal_pids),
            ("pid.numbers", self.pid_numbers),
        ];
        all.into_iter().filter(|(_, v)| v.is_none()).map(|(n, _)| n).collect()
    }
}

/// Byte offset of `field` in `struct strukt`, looking through anonymous struct and union
/// members (mm_struct keeps most fields in one).
fn member_offset(btf: &Btf, strukt: &str, field: &str) -> Option<u32> {
    let types = btf.resolve_types_by_name(strukt).ok()?;
    types.iter().find_map(|t| match t {
        Type::Struct(s) if !s.members.is_empty() => find_in(btf, s, field, 0),
        _ => None,
    })
}

fn find_in(btf: &Btf, s: &btf_rs::Struct, field: &str, base_bits: u32) -> Option<u32> {
    for m in &s.members {
        if m.bitfield_size().is_some_and(|size| size != 0) {
            continue;
        }
        let bits = base_bits + m.bit_offset();
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == field {
            return (bits % 8 == 0).then_some(bits / 8);
        }
        if name.is_empty() {
            if let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(m) {
                if let Some(off) = find_in(btf, &inner, field, bits) {
                    return Some(off);
                }
            }
        }
    }
    None
}
