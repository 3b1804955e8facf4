//! Start-up probe of the kernel's io_uring: which operations the ring supports. The
//! server reports it in `/health` so an operator sees why a feature is off.

/// What the kernel's io_uring offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UringProbe {
    /// A ring could be created at all.
    pub available: bool,
    /// The error when it could not.
    pub error: Option<String>,
    pub read: bool,
    pub write: bool,
    pub fsync: bool,
    pub fixed_buffers: bool,
    pub sync_file_range: bool,
}

/// Creates a small ring and asks the kernel which opcodes it supports.
pub fn probe_io_uring() -> UringProbe {
    use io_uring::{opcode, IoUring, Probe};
    let ring = match IoUring::new(2) {
        Ok(r) => r,
        Err(e) => {
            return UringProbe {
                error: Some(e.to_string()),
                ..UringProbe::default()
            }
        }
    };
    let mut probe = Probe::new();
    if let Err(e) = ring.submitter().register_probe(&mut probe) {
        return UringProbe {
            available: true,
            error: Some(format!("probe: {e}")),
            ..UringProbe::default()
        };
    }
    UringProbe {
        available: true,
        error: None,
        read: probe.is_supported(opcode::Read::CODE),
        write: probe.is_supported(opcode::Write::CODE),
        fsync: probe.is_supported(opcode::Fsync::CODE),
        fixed_buffers: probe.is_supported(opcode::WriteFixed::CODE),
        sync_file_range: probe.is_supported(opcode::SyncFileRange::CODE),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_reports_basic_opcodes_on_this_kernel() {
        let probe = super::probe_io_uring();
        assert!(probe.available, "io_uring unavailable: {:?}", probe.error);
        assert!(probe.write && probe.fsync, "{probe:?}");
    }
}
