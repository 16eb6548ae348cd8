//! A registered region's public data: what `getPublicData` returns and
//! `loadRemoteMD` receives back on the peer, through NIXL's metadata.

use serde::{Deserialize, Serialize};

use super::{Envelope, WireError};

const ENVELOPE: Envelope = Envelope {
    magic: b"MCrg",
    version: 1,
    kind: "region public data",
};

/// Version 2: the fields of version 1, then an [`IpcExport`]. Written only
/// for GPU memory that can be shared with CUDA IPC; everything else is
/// written (and read by older builds) as version 1.
const ENVELOPE_IPC: Envelope = Envelope {
    magic: b"MCrg",
    version: 2,
    kind: "region public data",
};

/// Version 3: the fields of version 1, then the region's [`RdmaKeys`].
/// Written only for regions registered on RDMA NICs.
const ENVELOPE_RDMA: Envelope = Envelope {
    magic: b"MCrg",
    version: 3,
    kind: "region public data",
};

/// Version 4: the fields of version 1, then a [`VmmExport`]. Written only
/// for GPU memory in VMM chunks that can be shared by file descriptor.
const ENVELOPE_VMM: Envelope = Envelope {
    magic: b"MCrg",
    version: 4,
    kind: "region public data",
};

/// Most VMM chunks a region shared by file descriptors may span (each is an
/// open file descriptor in the owner's process while registered).
pub const MAX_VMM_PIECES: usize = 1024;

/// Most pieces one region may be registered in on one NIC.
pub const MAX_RDMA_PIECES: usize = 4096;

/// How peers address a region over RDMA: it is registered on each of the
/// owner's NICs (in the order of its connection info's RDMA list) in
/// pieces of `piece_len` bytes (the last may be shorter), each with its
/// rkey.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaKeys {
    /// Length of every piece but the last.
    pub piece_len: u64,
    /// Per NIC, the rkey of each piece.
    pub nics: Vec<Vec<u32>>,
}

impl RdmaKeys {
    /// The rkey on NIC `nic` covering `[addr, addr + len)` of a region
    /// starting at `region_addr`; `None` when the range crosses a piece
    /// boundary or lies outside the pieces.
    pub fn rkey(&self, nic: usize, region_addr: u64, addr: u64, len: u64) -> Option<u32> {
        let piece = self.piece_len.max(1);
        let off = addr.checked_sub(region_addr)?;
        let first = off / piece;
        let last = off.checked_add(len.max(1) - 1)? / piece;
        if first != last {
            return None;
        }
        self.nics.get(nic)?.get(first as usize).copied()
    }
}

/// How a process on the same host can map a GPU region of ours: the CUDA
/// IPC handle of the allocation the region lies in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcExport {
    /// Start of the allocation (device address in the owner's process).
    pub base: u64,
    /// Its size.
    pub size: u64,
    /// The driver's id of the allocation.
    pub buffer_id: u64,
    /// The 64-byte `CUipcMemHandle` of the allocation.
    pub handle: [u64; 8],
}

/// One VMM chunk of a GPU region shared by file descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPiece {
    /// Where the chunk is mapped in the owner's process.
    pub base: u64,
    /// Its mapped size.
    pub size: u64,
    /// The owner's file descriptor of the chunk's allocation
    /// (`cuMemExportToShareableHandle`, POSIX file descriptor), open while
    /// the region is registered; a peer takes it with `pidfd_getfd`.
    pub fd: i32,
}

/// How a process on the same host can map a GPU region of ours made of VMM
/// chunks: adjacent chunks, in address order, covering the region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmExport {
    /// The chunks.
    pub pieces: Vec<VmmPiece>,
}

impl VmmExport {
    /// Where the first chunk starts in the owner's process.
    pub fn base(&self) -> u64 {
        self.pieces.first().map_or(0, |p| p.base)
    }

    /// The bytes the chunks span.
    pub fn size(&self) -> u64 {
        self.pieces.iter().map(|p| p.size).sum()
    }
}

/// What a peer needs to address one of our registered regions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionPublic {
    /// The owning engine's token (see [`super::conn_info::ConnInfo::token`]).
    pub owner: u128,
    /// Random access key of the registration; every access must name it.
    pub key: u64,
    /// Start address in the owner's address space.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// NIXL memory type (`nixl_mem_t`).
    pub mem_type: u32,
    /// Device id (GPU index for VRAM, 0 for DRAM).
    pub dev_id: u64,
    /// For GPU memory shareable on this host: the allocation's IPC handle.
    #[serde(skip)]
    pub ipc: Option<IpcExport>,
    /// For a region registered on RDMA NICs: its keys there.
    #[serde(skip)]
    pub rdma: Option<std::sync::Arc<RdmaKeys>>,
    /// For GPU memory in VMM chunks shareable on this host: the chunks.
    #[serde(skip)]
    pub vmm: Option<std::sync::Arc<VmmExport>>,
}

impl RegionPublic {
    /// Encodes into the blob NIXL carries.
    pub fn encode(&self) -> Vec<u8> {
        match (&self.ipc, &self.vmm, &self.rdma) {
            (Some(ipc), _, _) => ENVELOPE_IPC.encode(&(self, ipc)),
            (None, Some(vmm), _) => ENVELOPE_VMM.encode(&(self, &**vmm)),
            (None, None, Some(keys)) => ENVELOPE_RDMA.encode(&(self, &**keys)),
            (None, None, None) => ENVELOPE.encode(self),
        }
    }

    /// Decodes a peer's blob.
    ///
    /// # Errors
    /// A [`WireError`] when the blob is not region data of this version.
    pub fn decode(blob: &[u8]) -> Result<RegionPublic, WireError> {
        let region = match blob.get(4) {
            Some(&v) if v == ENVELOPE_IPC.version => {
                let (region, ipc): (RegionPublic, IpcExport) = ENVELOPE_IPC.decode(blob)?;
                let inside = ipc.base.checked_add(ipc.size).is_some()
                    && range_within(ipc.base, ipc.size, region.addr, region.len);
                if !inside {
                    return Err(WireError::Body {
                        kind: ENVELOPE.kind,
                        why: format!(
                            "region {:#x}+{} lies outside its IPC allocation {:#x}+{}",
                            region.addr, region.len, ipc.base, ipc.size
                        ),
                    });
                }
                RegionPublic {
                    ipc: Some(ipc),
                    ..region
                }
            }
            Some(&v) if v == ENVELOPE_VMM.version => {
                let (region, vmm): (RegionPublic, VmmExport) = ENVELOPE_VMM.decode(blob)?;
                check_vmm(&region, &vmm)?;
                RegionPublic {
                    vmm: Some(std::sync::Arc::new(vmm)),
                    ..region
                }
            }
            Some(&v) if v == ENVELOPE_RDMA.version => {
                let (region, keys): (RegionPublic, RdmaKeys) = ENVELOPE_RDMA.decode(blob)?;
                check_keys(&region, &keys)?;
                RegionPublic {
                    rdma: Some(std::sync::Arc::new(keys)),
                    ..region
                }
            }
            _ => ENVELOPE.decode(blob)?,
        };
        if region.addr.checked_add(region.len).is_none() {
            return Err(WireError::Body {
                kind: ENVELOPE.kind,
                why: format!(
                    "region {:#x}+{} wraps around the address space",
                    region.addr, region.len
                ),
            });
        }
        Ok(region)
    }

    /// True when `[addr, addr+len)` lies inside this region (overflow-safe).
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        range_within(self.addr, self.len, addr, len)
    }
}

/// Checks that `vmm` is 1 to [`MAX_VMM_PIECES`] adjacent chunks, none
/// empty, with file descriptors, that together contain `region`.
fn check_vmm(region: &RegionPublic, vmm: &VmmExport) -> Result<(), WireError> {
    let bad = |why: String| {
        Err(WireError::Body {
            kind: ENVELOPE.kind,
            why,
        })
    };
    if vmm.pieces.is_empty() || vmm.pieces.len() > MAX_VMM_PIECES {
        return bad(format!(
            "{} VMM chunks (1..={MAX_VMM_PIECES})",
            vmm.pieces.len()
        ));
    }
    let mut end = vmm.base();
    for p in &vmm.pieces {
        if p.base != end || p.size == 0 || p.fd < 0 {
            return bad(format!(
                "VMM chunk {:#x}+{} (fd {}) does not follow the one before at {end:#x}",
                p.base, p.size, p.fd
            ));
        }
        end = match p.base.checked_add(p.size) {
            Some(e) => e,
            None => return bad("VMM chunks wrap around the address space".into()),
        };
    }
    if !range_within(vmm.base(), end - vmm.base(), region.addr, region.len) {
        return bad(format!(
            "region {:#x}+{} lies outside its VMM chunks {:#x}..{end:#x}",
            region.addr,
            region.len,
            vmm.base()
        ));
    }
    Ok(())
}

/// Checks that `keys` name every piece of `region` on 1 to 64 NICs.
fn check_keys(region: &RegionPublic, keys: &RdmaKeys) -> Result<(), WireError> {
    let bad = |why: String| {
        Err(WireError::Body {
            kind: ENVELOPE.kind,
            why,
        })
    };
    if keys.piece_len == 0 {
        return bad("RDMA pieces of 0 bytes".into());
    }
    let pieces = region.len.div_ceil(keys.piece_len);
    if pieces == 0 || pieces > MAX_RDMA_PIECES as u64 {
        return bad(format!(
            "{pieces} RDMA pieces of {} bytes for {} bytes (1..={MAX_RDMA_PIECES})",
            keys.piece_len, region.len
        ));
    }
    if keys.nics.is_empty() || keys.nics.len() > super::conn_info::MAX_RDMA_NICS {
        return bad(format!("RDMA keys for {} NICs", keys.nics.len()));
    }
    if let Some(n) = keys.nics.iter().find(|n| n.len() as u64 != pieces) {
        return bad(format!("{} RDMA keys for {pieces} pieces", n.len()));
    }
    Ok(())
}

/// True when `[addr, addr+len)` lies inside `[base, base+size)`, without overflow.
pub fn range_within(base: u64, size: u64, addr: u64, len: u64) -> bool {
    addr >= base && len <= size && addr - base <= size - len
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: RegionPublic = RegionPublic {
        owner: 42,
        key: 0xdead_beef,
        addr: 0x7f00_0000_1000,
        len: 1 << 20,
        mem_type: 0,
        dev_id: 0,
        ipc: None,
        rdma: None,
        vmm: None,
    };

    #[test]
    fn round_trips_and_rejects_truncation() {
        let gpu = RegionPublic {
            mem_type: 1,
            dev_id: 1,
            ipc: Some(IpcExport {
                base: SAMPLE.addr - 4096,
                size: SAMPLE.len + 8192,
                buffer_id: 9,
                handle: [1, 2, 3, 4, 5, 6, 7, u64::MAX],
            }),
            ..SAMPLE
        };
        let rdma = RegionPublic {
            rdma: Some(std::sync::Arc::new(RdmaKeys {
                piece_len: 300_000,
                nics: vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8]],
            })),
            ..SAMPLE
        };
        assert_eq!(rdma.encode()[4], 3);
        let vmm = RegionPublic {
            mem_type: 1,
            vmm: Some(std::sync::Arc::new(VmmExport {
                pieces: vec![
                    VmmPiece {
                        base: SAMPLE.addr - 4096,
                        size: 1 << 19,
                        fd: 17,
                    },
                    VmmPiece {
                        base: SAMPLE.addr - 4096 + (1 << 19),
                        size: 1 << 20,
                        fd: 3,
                    },
                ],
            })),
            ..SAMPLE
        };
        assert_eq!(vmm.encode()[4], 4);
        for region in [SAMPLE, gpu.clone(), rdma, vmm] {
            let blob = region.encode();
            assert_eq!(RegionPublic::decode(&blob).unwrap(), region);
            for cut in 0..blob.len() {
                assert!(RegionPublic::decode(&blob[..cut]).is_err());
            }
        }
        assert_eq!(
            SAMPLE.encode()[4],
            1,
            "without IPC: version 1, as older builds read"
        );
        assert_eq!(gpu.encode()[4], 2);
    }

    #[test]
    fn rdma_keys_must_name_every_piece() {
        let with = |piece_len, nics: Vec<Vec<u32>>| RegionPublic {
            rdma: Some(std::sync::Arc::new(RdmaKeys { piece_len, nics })),
            ..SAMPLE
        };
        // 1 MiB in pieces of 300,000 bytes: 4 pieces.
        assert!(RegionPublic::decode(&with(300_000, vec![vec![1, 2, 3, 4]]).encode()).is_ok());
        assert!(RegionPublic::decode(&with(300_000, vec![vec![1, 2, 3]]).encode()).is_err());
        assert!(RegionPublic::decode(&with(0, vec![vec![1]]).encode()).is_err());
        assert!(
            RegionPublic::decode(&with(1, vec![vec![1]]).encode()).is_err(),
            "too many pieces"
        );
        assert!(RegionPublic::decode(&with(1 << 20, vec![]).encode()).is_err());
        let keys = RdmaKeys {
            piece_len: 100,
            nics: vec![vec![7, 8, 9], vec![17, 18, 19]],
        };
        assert_eq!(keys.rkey(0, 1000, 1000, 100), Some(7));
        assert_eq!(keys.rkey(1, 1000, 1150, 50), Some(18));
        assert_eq!(keys.rkey(0, 1000, 1250, 30), Some(9));
        assert_eq!(keys.rkey(0, 1000, 1050, 100), None, "crosses a boundary");
        assert_eq!(keys.rkey(0, 1000, 1300, 1), None, "beyond the last piece");
        assert_eq!(keys.rkey(0, 1000, 999, 1), None, "before the region");
        assert_eq!(keys.rkey(2, 1000, 1000, 1), None, "no such NIC");
    }

    #[test]
    fn an_ipc_allocation_that_does_not_contain_the_region_is_refused() {
        let mut region = SAMPLE;
        region.ipc = Some(IpcExport {
            base: SAMPLE.addr + 1,
            size: SAMPLE.len,
            buffer_id: 1,
            handle: [0; 8],
        });
        assert!(RegionPublic::decode(&region.encode()).is_err());
        region.ipc = Some(IpcExport {
            base: u64::MAX - 1,
            size: 10,
            buffer_id: 1,
            handle: [0; 8],
        });
        assert!(RegionPublic::decode(&region.encode()).is_err());
    }

    #[test]
    fn vmm_chunks_must_be_adjacent_and_contain_the_region() {
        let with = |pieces: Vec<(u64, u64, i32)>| RegionPublic {
            vmm: Some(std::sync::Arc::new(VmmExport {
                pieces: pieces
                    .into_iter()
                    .map(|(base, size, fd)| VmmPiece { base, size, fd })
                    .collect(),
            })),
            ..SAMPLE
        };
        let (a, half) = (SAMPLE.addr, SAMPLE.len / 2);
        let ok = |p| RegionPublic::decode(&with(p).encode()).is_ok();
        assert!(ok(vec![(a, half, 5), (a + half, half, 6)]));
        assert!(!ok(vec![]), "no chunk");
        assert!(!ok(vec![(a, half, 5), (a + half + 1, half, 6)]), "a gap");
        assert!(!ok(vec![(a, half, 5)]), "too short");
        assert!(!ok(vec![(a + 1, SAMPLE.len, 5)]), "starts after the region");
        assert!(!ok(vec![(a, half, -1), (a + half, half, 6)]), "no fd");
        assert!(!ok(vec![(a, 0, 5), (a, SAMPLE.len, 6)]), "an empty chunk");
        assert!(!ok(vec![(u64::MAX - 1, 10, 5)]), "wraps");
        let many = (0..=MAX_VMM_PIECES as u64)
            .map(|i| (a + i * 4096, 4096, 3))
            .collect();
        assert!(!ok(many), "too many chunks");
    }

    #[test]
    fn a_region_that_wraps_around_the_address_space_is_refused() {
        let wrapping = RegionPublic {
            addr: u64::MAX - 10,
            len: 100,
            ..SAMPLE
        };
        let e = RegionPublic::decode(&wrapping.encode()).unwrap_err();
        assert!(e.to_string().contains("wraps"), "{e}");
        let edge = RegionPublic {
            addr: u64::MAX - 100,
            len: 100,
            ..SAMPLE
        };
        assert_eq!(RegionPublic::decode(&edge.encode()), Ok(edge));
    }

    #[test]
    fn is_not_confused_with_conn_info() {
        let blob = SAMPLE.encode();
        assert!(super::super::conn_info::ConnInfo::decode(&blob).is_err());
    }

    #[test]
    fn range_checks_are_overflow_safe() {
        assert!(SAMPLE.contains(SAMPLE.addr, SAMPLE.len));
        assert!(SAMPLE.contains(SAMPLE.addr + 10, 0));
        assert!(!SAMPLE.contains(SAMPLE.addr - 1, 1));
        assert!(!SAMPLE.contains(SAMPLE.addr + 1, SAMPLE.len));
        assert!(!SAMPLE.contains(u64::MAX, 2));
        assert!(!SAMPLE.contains(SAMPLE.addr, u64::MAX));
        assert!(range_within(0, u64::MAX, u64::MAX - 1, 1));
    }
}
