//! The on-disk spool: where batches wait while InfluxDB cannot take them.
//!
//! # Layout
//!
//! One directory per subscriber (default `<state_dir>/spool/<name>`) holding
//! append-only segment files named by a growing number
//! (`00000000000000000042.seg`). Each segment starts with the 8-byte magic
//! `NBPYSPL1` and then holds records:
//!
//! ```text
//! [len u32 LE][crc32 u32 LE][payload: points u32 LE, rp_len u8, rp, line protocol]
//! ```
//!
//! `len` is the payload's length and the CRC (IEEE, as `crc32fast`) covers
//! the payload. A record is a whole write request: line protocol that was
//! encoded once, with its timestamps fixed, so writing it twice stores the
//! same points (same series + time overwrite) and replays are idempotent.
//!
//! # Durability
//!
//! Appends go straight to the file (no user-space buffer), so a `kill -9`
//! loses nothing that `append` returned for; `fsync` decides what a power
//! loss can take: [`Fsync::Batch`] syncs every record, [`Fsync::Every`]
//! at most that often (and on [`Spool::sync`]). A new segment's directory
//! entry is synced along with its first data.
//!
//! # Recovery
//!
//! [`Spool::open`] reads every segment and checks every record. A record cut
//! short (the process died mid-append; only possible at the end of the
//! newest segment, anywhere else it is damage) or failing its CRC ends the
//! segment:
//! the file is truncated to the last good record, the cut bytes are kept
//! next to it as `<segment>.damaged` for a human, and the damage is counted
//! in [`Recovery`]. Later segments are kept: a damaged record loses at most
//! the rest of its own segment. Segments are never appended to after a
//! restart; new records start a new segment.
//!
//! # Replay and deletion
//!
//! [`Spool::next_record`] hands out records oldest first (several may be in flight
//! at once); [`Spool::ack`] marks one delivered. A segment is deleted once it
//! has been read to its end and every record handed out from it is acked,
//! so a crash replays at most the records of the (at most few) segments in
//! flight: again, harmless. Nothing records a read position on disk. A
//! record a stop interrupts goes back whole ([`Spool::release`]), or, when
//! InfluxDB already wrote or refused part of it, its rest takes its place
//! ([`Spool::release_rest`]), so the disk holds only what is undelivered.
//!
//! # Size limit
//!
//! `max_bytes` bounds the files. When an append would pass it, the policy
//! decides: [`WhenFull::Block`] refuses the append ([`Appended::Full`]) so the
//! caller waits for replay to free room, [`WhenFull::DropOldest`] deletes the
//! oldest segments and counts their unread points as dropped. A record larger
//! than the whole limit is still taken into an empty spool (refusing it would
//! block forever), and `force` appends ignore the limit: a stopping subscriber
//! spools what it holds rather than lose it, which exceeds the limit by at
//! most what it had in memory (bus buffer, open batches, queue).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::WhenFull;

pub const MAGIC: &[u8; 8] = b"NBPYSPL1";
pub const HEADER_LEN: u64 = MAGIC.len() as u64;
/// `len` + `crc`.
pub const RECORD_HEADER: u64 = 8;
/// A length beyond this is damage, not a record (a batch of a million
/// points of 1 KiB each is the largest the configuration allows).
const MAX_RECORD: u32 = 1 << 30;
const EXT: &str = "seg";

/// When appended records are forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fsync {
    /// After every record: a power loss loses nothing that was spooled.
    #[default]
    Batch,
    /// At most this often: a power loss loses at most this much.
    Every(Duration),
}

impl std::fmt::Display for Fsync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fsync::Batch => f.write_str("batch"),
            Fsync::Every(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

impl std::str::FromStr for Fsync {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "batch" {
            return Ok(Fsync::Batch);
        }
        match humantime::parse_duration(s) {
            Ok(d) if !d.is_zero() => Ok(Fsync::Every(d)),
            Ok(_) => Err("an fsync interval must be positive (or say \"batch\")".into()),
            Err(e) => Err(format!(
                "fsync = {s:?}: expected \"batch\" or an interval like \"100ms\" ({e})"
            )),
        }
    }
}

impl Serialize for Fsync {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Fsync {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone)]
pub struct SpoolOptions {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub segment_bytes: u64,
    pub fsync: Fsync,
    pub when_full: WhenFull,
}

/// What [`Spool::open`] found.
#[derive(Debug, Default, Clone)]
pub struct Recovery {
    pub segments: usize,
    pub records: u64,
    pub points: u64,
    pub bytes: u64,
    pub damage: Vec<Damage>,
}

/// A cut made on open.
#[derive(Debug, Clone)]
pub struct Damage {
    pub segment: PathBuf,
    /// Where the good data ends.
    pub offset: u64,
    /// Bytes cut off (moved to `<segment>.damaged`).
    pub cut_bytes: u64,
    pub reason: String,
}

impl Damage {
    /// A tail cut short mid-append (a crash), not damage to data the
    /// subscriber had already called safe.
    pub fn is_torn(&self) -> bool {
        self.reason.starts_with("torn ")
    }
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} at byte {}, {} byte(s) cut and kept in {}.damaged; {}",
            self.segment.display(),
            self.reason,
            self.offset,
            self.cut_bytes,
            self.segment.display(),
            if self.is_torn() {
                "a write cut short by a crash: that data was not yet safe, so the \
                 sequence gap reported after this start covers it"
            } else {
                "the points in them cannot be counted (their records cannot be \
                 trusted) and no sequence gap shows them: they were safe on disk"
            }
        )
    }
}

/// One spooled write request, handed out for replay.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The segment it came from; pass to [`Spool::ack`].
    pub segment: u64,
    pub rp: String,
    pub points: u32,
    pub lines: Vec<u8>,
}

/// What [`Spool::release_rest`] kept on disk.
#[derive(Debug)]
pub enum Kept {
    /// The undelivered points alone.
    Rest,
    /// The disk refused the rest, so the record stays whole:
    /// `delivered_too` of its points were already written or refused, and
    /// go again at the next start.
    Whole {
        delivered_too: u64,
        error: io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// On file. `dropped` points of older records were deleted to make room
    /// (drop-oldest policy).
    Stored { dropped: u64 },
    /// Block policy and no room: nothing was written; wait for replay.
    Full,
}

#[derive(Debug)]
struct Segment {
    id: u64,
    len: u64,
    records: u64,
    points: u64,
    read_offset: u64,
    read_points: u64,
    /// Records (and their points) handed out and not yet acked.
    in_flight: u64,
    in_flight_points: u64,
    /// Records (and their points) handed out and given back by
    /// [`Spool::release`]: they are past the read cursor but still only
    /// on disk, so they count as held and keep their segment's file.
    released: u64,
    released_points: u64,
    /// Its file was found missing (deleted behind the spool's back): a
    /// record of it handed out and then released is no longer on disk.
    gone: bool,
}

impl Segment {
    fn fully_read(&self) -> bool {
        self.read_offset >= self.len
    }

    /// Points of it only on disk: not yet read, or read and given back.
    fn undelivered(&self) -> u64 {
        self.points - self.read_points + self.released_points
    }
}

/// Counters over the spool's life in this process.
#[derive(Debug, Default, Clone, Copy)]
pub struct SpoolCounters {
    pub appended_points: u64,
    pub dropped_points: u64,
    pub damaged_records: u64,
    pub damaged_bytes: u64,
    /// Of those, bytes cut on open: their points were never counted.
    pub uncounted_bytes: u64,
}

pub struct Spool {
    opts: SpoolOptions,
    segments: VecDeque<Segment>,
    /// Append handle of the newest segment, when it takes appends.
    active: Option<(u64, File)>,
    /// Read handle, cached for the segment being read.
    reader: Option<(u64, File)>,
    next_id: u64,
    bytes: u64,
    dirty: bool,
    dir_dirty: bool,
    last_sync: Instant,
    pub counters: SpoolCounters,
}

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.{EXT}"))
}

fn crc(points: u32, rp: &[u8], lines: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&points.to_le_bytes());
    h.update(&[rp.len() as u8]);
    h.update(rp);
    h.update(lines);
    h.finalize()
}

/// Scans one segment: good length, records, points, and damage if any.
///
/// A record running past the end of the file is a crash's torn tail only
/// in the `newest` segment: older ones were synced and closed before the
/// next was started, and are never appended to after a restart. Anywhere
/// else it is damage (a corrupted length, a lost end of file), whose points
/// were safe and must be counted as such, not left to a sequence gap that
/// a clean earlier stop never reports.
fn scan(path: &Path, newest: bool) -> io::Result<(u64, u64, u64, Option<String>)> {
    let short = |what: String| {
        if newest {
            format!("torn {what}")
        } else {
            format!(
                "{what} cut short in a closed segment (only the newest segment is appended \
                 to, so not by a crash: a damaged length or a lost end of file)"
            )
        }
    };
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut f = io::BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 8];
    if let Err(e) = f.read_exact(&mut magic) {
        return Ok((0, 0, 0, Some(format!("no segment header ({e})"))));
    }
    if &magic != MAGIC {
        return Ok((0, 0, 0, Some("not a spool segment (bad magic)".into())));
    }
    let (mut good, mut records, mut points) = (HEADER_LEN, 0u64, 0u64);
    let mut payload = Vec::new();
    loop {
        let mut head = [0u8; 8];
        match read_full(&mut f, &mut head)? {
            0 => return Ok((good, records, points, None)),
            8 => {}
            n => {
                return Ok((
                    good,
                    records,
                    points,
                    Some(short(format!("record header ({n} of 8 bytes)"))),
                ))
            }
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let want = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if !(5..=MAX_RECORD).contains(&len) {
            return Ok((
                good,
                records,
                points,
                Some(format!("impossible record length {len}")),
            ));
        }
        let avail = file_len.saturating_sub(good + RECORD_HEADER);
        if len as u64 > avail {
            // Cut short (or a damaged length): no need to read it to know.
            return Ok((
                good,
                records,
                points,
                Some(short(format!("record ({avail} of {len} bytes)"))),
            ));
        }
        payload.resize(len as usize, 0);
        let n = read_full(&mut f, &mut payload)?;
        if n < payload.len() {
            return Ok((
                good,
                records,
                points,
                Some(short(format!("record ({n} of {len} bytes)"))),
            ));
        }
        let Some((p, rp, lines)) = parse_payload(&payload) else {
            return Ok((
                good,
                records,
                points,
                Some("malformed record payload".into()),
            ));
        };
        if crc(p, rp, lines) != want {
            return Ok((good, records, points, Some("checksum mismatch".into())));
        }
        good += RECORD_HEADER + len as u64;
        records += 1;
        points += p as u64;
    }
}

/// Reads until `buf` is full or end of file; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn parse_payload(p: &[u8]) -> Option<(u32, &[u8], &[u8])> {
    let points = u32::from_le_bytes(p.get(..4)?.try_into().ok()?);
    let rp_len = *p.get(4)? as usize;
    let rp = p.get(5..5 + rp_len)?;
    let lines = p.get(5 + rp_len..)?;
    Some((points, rp, lines))
}

/// Moves `path`'s bytes from `offset` on into `<path>.damaged` and truncates.
fn cut(path: &Path, offset: u64) -> io::Result<u64> {
    let f = OpenOptions::new().read(true).write(true).open(path)?;
    let len = f.metadata()?.len();
    if len <= offset {
        return Ok(0);
    }
    let mut tail = vec![0u8; (len - offset) as usize];
    f.read_exact_at(&mut tail, offset)?;
    let mut keep = path.as_os_str().to_owned();
    keep.push(".damaged");
    let mut d = OpenOptions::new().create(true).append(true).open(&keep)?;
    d.write_all(&tail)?;
    d.sync_all()?;
    f.set_len(offset)?;
    f.sync_all()?;
    Ok(len - offset)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Spool {
    /// Opens (creating) the spool directory, checks every segment and cuts
    /// damage off. Fails only when the directory itself is unusable.
    pub fn open(opts: SpoolOptions) -> io::Result<(Spool, Recovery)> {
        std::fs::create_dir_all(&opts.dir)?;
        let mut ids: Vec<u64> = Vec::new();
        for entry in std::fs::read_dir(&opts.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(&format!(".{EXT}")) {
                if let Ok(id) = stem.parse::<u64>() {
                    ids.push(id);
                }
            }
        }
        ids.sort_unstable();
        let mut rec = Recovery::default();
        let mut segments = VecDeque::new();
        let mut counters = SpoolCounters::default();
        for id in &ids {
            let path = seg_path(&opts.dir, *id);
            let (good, records, points, damage) = scan(&path, Some(id) == ids.last())?;
            if let Some(reason) = damage {
                let cut_bytes = cut(&path, good)?;
                counters.damaged_records += 1;
                counters.damaged_bytes += cut_bytes;
                let d = Damage {
                    segment: path.clone(),
                    offset: good,
                    cut_bytes,
                    reason,
                };
                if !d.is_torn() {
                    counters.uncounted_bytes += cut_bytes;
                }
                rec.damage.push(d);
            }
            if records == 0 {
                // Nothing worth keeping (an empty or unreadable segment).
                std::fs::remove_file(&path)?;
                continue;
            }
            rec.segments += 1;
            rec.records += records;
            rec.points += points;
            rec.bytes += good;
            segments.push_back(Segment {
                id: *id,
                len: good,
                records,
                points,
                read_offset: HEADER_LEN,
                read_points: 0,
                in_flight: 0,
                in_flight_points: 0,
                released: 0,
                released_points: 0,
                gone: false,
            });
        }
        let next_id = ids.last().map(|i| i + 1).unwrap_or(1);
        let spool = Spool {
            bytes: rec.bytes,
            opts,
            segments,
            active: None,
            reader: None,
            next_id,
            dirty: false,
            dir_dirty: false,
            last_sync: Instant::now(),
            counters,
        };
        Ok((spool, rec))
    }

    pub fn options(&self) -> &SpoolOptions {
        &self.opts
    }

    pub fn dir(&self) -> &Path {
        &self.opts.dir
    }

    /// Bytes of segment files.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Points not yet acked (unread, in flight, or released for the next
    /// start).
    pub fn points(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.points - s.read_points + s.in_flight_points + s.released_points)
            .sum()
    }

    /// Points not yet handed out for replay.
    pub fn unread_points(&self) -> u64 {
        self.segments.iter().map(|s| s.points - s.read_points).sum()
    }

    pub fn has_unread(&self) -> bool {
        self.segments.iter().any(|s| !s.fully_read())
    }

    /// No segment left: everything spooled has been delivered (or dropped).
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Appends one record. `force` ignores the size limit (used on stop).
    pub fn append(
        &mut self,
        rp: &str,
        points: u32,
        lines: &[u8],
        force: bool,
    ) -> io::Result<Appended> {
        let rp_b = rp.as_bytes();
        if rp_b.len() > u8::MAX as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "retention policy name too long",
            ));
        }
        let payload_len = 4 + 1 + rp_b.len() + lines.len();
        if payload_len > MAX_RECORD as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "record too large for the spool",
            ));
        }
        let rec_len = RECORD_HEADER + payload_len as u64;
        let mut dropped = 0;
        if !force && self.bytes + rec_len > self.opts.max_bytes && !self.segments.is_empty() {
            match self.opts.when_full {
                WhenFull::Block => return Ok(Appended::Full),
                WhenFull::DropOldest => {
                    while self.bytes + rec_len > self.opts.max_bytes {
                        match self.drop_oldest()? {
                            Some(points) => dropped += points,
                            // Only segments with records in flight are
                            // left: the append goes over the limit by them.
                            None => break,
                        }
                    }
                }
            }
        }
        let needs_roll = match (&self.active, self.segments.back()) {
            (Some((id, _)), Some(last)) if *id == last.id => {
                last.len > HEADER_LEN && last.len + rec_len > self.opts.segment_bytes
            }
            _ => true,
        };
        if needs_roll {
            self.roll()?;
        }
        let Some((id, file)) = self.active.as_mut() else {
            return Err(io::Error::other("no active segment"));
        };
        let id = *id;
        let mut head = Vec::with_capacity(RECORD_HEADER as usize + 5 + rp_b.len());
        head.extend_from_slice(&(payload_len as u32).to_le_bytes());
        head.extend_from_slice(&crc(points, rp_b, lines).to_le_bytes());
        head.extend_from_slice(&points.to_le_bytes());
        head.push(rp_b.len() as u8);
        head.extend_from_slice(rp_b);
        let written = file.write_all(&head).and_then(|_| file.write_all(lines));
        let Some(seg) = self.segments.back_mut().filter(|s| s.id == id) else {
            return Err(io::Error::other("active segment vanished"));
        };
        if let Err(e) = written {
            // Undo the partial record so later appends stay readable; if even
            // that fails, retire the segment (open() cuts the tail later).
            if file.set_len(seg.len).is_err() {
                self.active = None;
            }
            return Err(e);
        }
        seg.len += rec_len;
        seg.records += 1;
        seg.points += points as u64;
        self.bytes += rec_len;
        self.dirty = true;
        self.counters.appended_points += points as u64;
        self.counters.dropped_points += dropped;
        match self.opts.fsync {
            Fsync::Batch => self.sync()?,
            Fsync::Every(d) => {
                if self.last_sync.elapsed() >= d {
                    self.sync()?;
                }
            }
        }
        Ok(Appended::Stored { dropped })
    }

    /// Starts a new segment for appends.
    fn roll(&mut self) -> io::Result<()> {
        if self.active.is_some() {
            // Data of the segment being left must reach the disk too.
            self.sync()?;
            self.active = None;
        }
        let id = self.next_id;
        self.next_id += 1;
        let path = seg_path(&self.opts.dir, id);
        let mut f = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        if let Err(e) = f.write_all(MAGIC) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        self.segments.push_back(Segment {
            id,
            len: HEADER_LEN,
            records: 0,
            points: 0,
            read_offset: HEADER_LEN,
            read_points: 0,
            in_flight: 0,
            in_flight_points: 0,
            released: 0,
            released_points: 0,
            gone: false,
        });
        self.bytes += HEADER_LEN;
        self.active = Some((id, f));
        self.dirty = true;
        self.dir_dirty = true;
        Ok(())
    }

    /// Deletes the oldest segment no record is in flight from; returns its
    /// points that were never read, or None when there is no such segment.
    ///
    /// A segment with a record in flight (the one the writer keeps retrying
    /// while InfluxDB is down) stays: were its file deleted, that record
    /// would live only in memory, and a stop or a crash before InfluxDB came
    /// back would lose it without a count. So the spool can exceed
    /// `max_bytes` by the segments records are in flight from (one, while
    /// InfluxDB is down).
    fn drop_oldest(&mut self) -> io::Result<Option<u64>> {
        let Some(i) = self
            .segments
            .iter()
            .position(|s| s.in_flight == 0 && s.released == 0)
        else {
            return Ok(None);
        };
        let Some(seg) = self.segments.remove(i) else {
            return Ok(None);
        };
        if self.active.as_ref().is_some_and(|(id, _)| *id == seg.id) {
            self.active = None;
        }
        if self.reader.as_ref().is_some_and(|(id, _)| *id == seg.id) {
            self.reader = None;
        }
        self.bytes = self.bytes.saturating_sub(seg.len);
        remove(&seg_path(&self.opts.dir, seg.id))?;
        Ok(Some(seg.points - seg.read_points))
    }

    /// Forces appended data (and new segments' directory entries) to disk.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.dirty {
            if let Some((_, f)) = &self.active {
                f.sync_data()?;
            }
            self.dirty = false;
        }
        if self.dir_dirty {
            sync_dir(&self.opts.dir)?;
            self.dir_dirty = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// For the interval policy: syncs when the interval has passed.
    pub fn sync_if_due(&mut self) -> io::Result<()> {
        match self.opts.fsync {
            Fsync::Every(d) if (self.dirty || self.dir_dirty) && self.last_sync.elapsed() >= d => {
                self.sync()
            }
            _ => Ok(()),
        }
    }

    /// The oldest record not yet handed out.
    pub fn next_record(&mut self) -> io::Result<Option<Record>> {
        loop {
            let Some(i) = self.segments.iter().position(|s| !s.fully_read()) else {
                return Ok(None);
            };
            let (id, off, len) = {
                let s = &self.segments[i];
                (s.id, s.read_offset, s.len)
            };
            if self.reader.as_ref().is_none_or(|(rid, _)| *rid != id) {
                match File::open(seg_path(&self.opts.dir, id)) {
                    Ok(f) => self.reader = Some((id, f)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        self.segment_gone(i)?;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some((_, f)) = self.reader.as_ref() else {
                return Ok(None);
            };
            let mut head = [0u8; 8];
            let parsed = f.read_exact_at(&mut head, off).and_then(|_| {
                let plen = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
                let want = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
                if !(5..=MAX_RECORD).contains(&plen) || off + RECORD_HEADER + plen as u64 > len {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "bad record length",
                    ));
                }
                let mut payload = vec![0u8; plen as usize];
                f.read_exact_at(&mut payload, off + RECORD_HEADER)?;
                let (points, rp, lines) = parse_payload(&payload).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "malformed payload")
                })?;
                if crc(points, rp, lines) != want {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "checksum mismatch",
                    ));
                }
                let rp = String::from_utf8_lossy(rp).into_owned();
                let head_len = 5 + rp.len();
                payload.drain(..head_len);
                Ok((
                    plen,
                    Record {
                        segment: id,
                        rp,
                        points,
                        lines: payload,
                    },
                ))
            });
            let seg = &mut self.segments[i];
            match parsed {
                Ok((plen, r)) => {
                    seg.read_offset += RECORD_HEADER + plen as u64;
                    seg.read_points += r.points as u64;
                    seg.in_flight += 1;
                    seg.in_flight_points += r.points as u64;
                    return Ok(Some(r));
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    // Damaged since it was checked on open (disk error):
                    // the rest of this segment is lost; count it, go on.
                    let lost = seg.len - seg.read_offset;
                    tracing::error!(
                        "spool segment {}: {e} at byte {}; skipping its remaining {lost} bytes",
                        seg_path(&self.opts.dir, id).display(),
                        seg.read_offset
                    );
                    self.counters.damaged_records += 1;
                    self.counters.damaged_bytes += lost;
                    self.counters.dropped_points += seg.points - seg.read_points;
                    seg.read_points = seg.points;
                    seg.read_offset = seg.len;
                    if self.active.as_ref().is_some_and(|(a, _)| *a == id) {
                        self.active = None;
                    }
                    self.collect()?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The file of segment `i` is gone (deleted by hand, or the whole
    /// directory): its unread points are lost. They are counted as dropped
    /// (spool damage), and replay goes on with the next segment; retrying
    /// the missing file stalled replay of every later segment until a
    /// restart, while the stop summary still counted the points as spooled.
    fn segment_gone(&mut self, i: usize) -> io::Result<()> {
        let dir = self.opts.dir.clone();
        let seg = &mut self.segments[i];
        // What was released from it (handed out, given back at a stop) is
        // not on disk either.
        let lost_points = seg.undelivered();
        let lost_bytes = seg.len - seg.read_offset;
        tracing::error!(
            "spool segment {} is missing (deleted while the subscriber ran?): its {lost_points} \
             undelivered point(s) are lost, counted as dropped (spool damage); replay goes on \
             with the next segment",
            seg_path(&dir, seg.id).display()
        );
        self.counters.damaged_records += 1;
        self.counters.damaged_bytes += lost_bytes;
        self.counters.dropped_points += lost_points;
        seg.read_points = seg.points;
        seg.released = 0;
        seg.released_points = 0;
        seg.gone = true;
        // No bytes on disk any more (the size limit and the summary count
        // files), and read to its end.
        self.bytes = self.bytes.saturating_sub(seg.len);
        seg.len = 0;
        seg.read_offset = 0;
        // Appends must not go on into a file no one can read back.
        let id = seg.id;
        if self.active.as_ref().is_some_and(|(a, _)| *a == id) {
            self.active = None;
            self.dirty = false;
        }
        self.collect()
    }

    /// Counts segments whose files are missing as [`Spool::next_record`]
    /// does when it reaches them. For a stop: its summary must not count
    /// points as spooled for later that are no longer on disk.
    pub fn forget_missing(&mut self) -> io::Result<()> {
        let mut i = 0;
        while i < self.segments.len() {
            let seg = &self.segments[i];
            if !seg.gone
                && seg.undelivered() > 0
                && !seg_path(&self.opts.dir, seg.id)
                    .try_exists()
                    .unwrap_or(true)
            {
                let before = self.segments.len();
                self.segment_gone(i)?;
                if self.segments.len() < before {
                    // `collect` removed segments from the front.
                    i = 0;
                    continue;
                }
            }
            i += 1;
        }
        Ok(())
    }

    /// One record from `segment` is delivered; deletes segments that are done.
    pub fn ack(&mut self, segment: u64, points: u32) -> io::Result<()> {
        self.settle(segment, points);
        self.collect()
    }

    /// A handed-out record will not be delivered by this process (it is
    /// stopping): it stays on disk for the next start.
    pub fn release(&mut self, segment: u64, points: u32) {
        self.settle(segment, points);
        if let Some(s) = self
            .segments
            .iter_mut()
            .find(|s| s.id == segment && !s.gone)
        {
            s.released += 1;
            s.released_points += points as u64;
        } else {
            // Its segment is gone (`drop_oldest` spares segments with
            // records in flight, so this is a defence): not delivered and
            // no longer on disk, the points are dropped, not unaccounted.
            self.counters.dropped_points += points as u64;
        }
    }

    /// A handed-out record was partly delivered (InfluxDB wrote or refused
    /// some of its points, then failed) and will not be finished by this
    /// process: `rest`, the `rest_points` points not delivered, takes its
    /// place on disk.
    ///
    /// [`Spool::release`] would keep the whole record, points already
    /// written or dead-lettered included: the stop summary counted those
    /// twice (delivered, and still spooled), and the next start sent them
    /// again, refused points reaching the dead-letter file a second time.
    /// The rest is appended before the record is acked, so a crash in
    /// between leaves both on disk (sent again: harmless), never neither.
    /// It goes to the end of the spool, not the record's place: InfluxDB
    /// stores by series and time, so the order of replay changes nothing.
    ///
    /// When the disk will not take the rest, the whole record is released
    /// instead, so nothing undelivered is lost: [`Kept::Whole`].
    pub fn release_rest(
        &mut self,
        segment: u64,
        points: u32,
        rp: &str,
        rest_points: u32,
        rest: &[u8],
    ) -> io::Result<Kept> {
        if rest_points == 0 {
            self.ack(segment, points)?;
            return Ok(Kept::Rest);
        }
        let before = self.counters.appended_points;
        match self.append(rp, rest_points, rest, true) {
            Ok(_) => {
                self.ack(segment, points)?;
                Ok(Kept::Rest)
            }
            // Its fsync failed, the rest is on file: keeping the whole
            // record too would hold the rest twice.
            Err(e) if self.counters.appended_points > before => {
                self.ack(segment, points)?;
                Err(e)
            }
            Err(error) => {
                if self.segments.iter().any(|s| s.id == segment && !s.gone) {
                    self.release(segment, points);
                    Ok(Kept::Whole {
                        delivered_too: u64::from(points.saturating_sub(rest_points)),
                        error,
                    })
                } else {
                    // As in `release`, a defence: not on disk any more, the
                    // undelivered points are dropped; the others were delivered.
                    self.settle(segment, points);
                    self.counters.dropped_points += u64::from(rest_points);
                    Ok(Kept::Whole {
                        delivered_too: 0,
                        error,
                    })
                }
            }
        }
    }

    fn settle(&mut self, segment: u64, points: u32) {
        if let Some(s) = self.segments.iter_mut().find(|s| s.id == segment) {
            s.in_flight = s.in_flight.saturating_sub(1);
            s.in_flight_points = s.in_flight_points.saturating_sub(points as u64);
        }
    }

    fn collect(&mut self) -> io::Result<()> {
        while let Some(front) = self.segments.front() {
            if !(front.fully_read() && front.in_flight == 0 && front.released == 0) {
                break;
            }
            let id = front.id;
            let len = front.len;
            self.segments.pop_front();
            if self.active.as_ref().is_some_and(|(a, _)| *a == id) {
                self.active = None;
                self.dirty = false;
            }
            if self.reader.as_ref().is_some_and(|(r, _)| *r == id) {
                self.reader = None;
            }
            self.bytes = self.bytes.saturating_sub(len);
            remove(&seg_path(&self.opts.dir, id))?;
        }
        Ok(())
    }
}

fn remove(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> SpoolOptions {
        SpoolOptions {
            dir: dir.to_path_buf(),
            max_bytes: 1 << 30,
            segment_bytes: 1 << 20,
            fsync: Fsync::Batch,
            when_full: WhenFull::Block,
        }
    }

    fn lines(n: usize, tag: &str) -> Vec<u8> {
        (0..n)
            .map(|i| format!("m,t={tag} v={i}i {i}\n"))
            .collect::<String>()
            .into_bytes()
    }

    fn drain(s: &mut Spool) -> Vec<Record> {
        let mut out = Vec::new();
        while let Some(r) = s.next_record().unwrap() {
            s.ack(r.segment, r.points).unwrap();
            out.push(r);
        }
        out
    }

    #[test]
    fn appends_replay_in_order_and_segments_go_once_acked() {
        let d = tempfile::tempdir().unwrap();
        let mut o = opts(d.path());
        o.segment_bytes = 300;
        let (mut s, rec) = Spool::open(o.clone()).unwrap();
        assert_eq!(rec.records, 0);
        for i in 0..10 {
            let l = lines(3, &i.to_string());
            assert_eq!(
                s.append("default", 3, &l, false).unwrap(),
                Appended::Stored { dropped: 0 }
            );
        }
        assert!(s.segments() > 2, "rolled into several segments");
        assert_eq!(s.unread_points(), 30);
        // Reopen: everything is still there, in order.
        drop(s);
        let (mut s, rec) = Spool::open(o).unwrap();
        assert_eq!((rec.records, rec.points, rec.damage.len()), (10, 30, 0));
        let first = s.next_record().unwrap().unwrap();
        assert_eq!(first.rp, "default");
        assert_eq!(first.lines, lines(3, "0"));
        s.ack(first.segment, first.points).unwrap();
        let rest = drain(&mut s);
        assert_eq!(rest.len(), 9);
        for (i, r) in rest.iter().enumerate() {
            assert_eq!(r.lines, lines(3, &(i + 1).to_string()));
        }
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert!(left.is_empty(), "segments deleted once delivered: {left:?}");
    }

    #[test]
    fn unacked_records_survive_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(opts(d.path())).unwrap();
        s.append("hf", 2, &lines(2, "a"), false).unwrap();
        s.append("hf", 2, &lines(2, "b"), false).unwrap();
        let r = s.next_record().unwrap().unwrap();
        assert_eq!(r.lines, lines(2, "a"));
        // Handed out but never acked (the process died writing it).
        drop(s);
        let (mut s, rec) = Spool::open(opts(d.path())).unwrap();
        assert_eq!(rec.records, 2);
        let got: Vec<_> = drain(&mut s).into_iter().map(|r| r.lines).collect();
        assert_eq!(got, vec![lines(2, "a"), lines(2, "b")]);
    }

    /// A record given back on stop is still the spool's to hold: `points`
    /// (the stop summary and the `spool_points` gauge) keeps counting it,
    /// and acking a later record of its segment does not delete the file
    /// it lives in. An ack is what lets it go.
    #[test]
    fn released_records_stay_counted_and_on_disk() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(opts(d.path())).unwrap();
        s.append("x", 2, &lines(2, "a"), false).unwrap();
        s.append("x", 3, &lines(3, "b"), false).unwrap();
        assert_eq!(s.points(), 5);
        let a = s.next_record().unwrap().unwrap();
        let b = s.next_record().unwrap().unwrap();
        assert_eq!(s.points(), 5, "in flight still counts");
        s.release(a.segment, a.points);
        assert_eq!(s.points(), 5, "released still counts");
        s.ack(b.segment, b.points).unwrap();
        assert_eq!(s.points(), 2, "acked does not");
        assert!(!s.is_empty(), "the released record's segment stays");
        drop(s);
        let (mut s, rec) = Spool::open(opts(d.path())).unwrap();
        assert_eq!((rec.records, rec.points), (2, 5), "both still on disk");
        let a = s.next_record().unwrap().unwrap();
        s.ack(a.segment, a.points).unwrap();
        assert_eq!(s.points(), 3);
    }

    /// What InfluxDB took of a record before a stop is not kept with it:
    /// only the rest stays, and the record's segment goes.
    #[test]
    fn a_partly_delivered_record_leaves_only_its_rest() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(opts(d.path())).unwrap();
        s.append("x", 4, &lines(4, "a"), false).unwrap();
        drop(s);
        let (mut s, _) = Spool::open(opts(d.path())).unwrap();
        let r = s.next_record().unwrap().unwrap();
        let all = lines(4, "a");
        let rest: Vec<u8> = all
            .split_inclusive(|b| *b == b'\n')
            .skip(2)
            .flatten()
            .copied()
            .collect();
        let kept = s.release_rest(r.segment, r.points, "x", 2, &rest).unwrap();
        assert!(matches!(kept, Kept::Rest), "{kept:?}");
        assert_eq!(s.points(), 2);
        drop(s);
        let files = segment_files(d.path());
        assert_eq!(files.len(), 1, "{files:?}");
        assert!(!files[0].ends_with(format!("{:020}.seg", r.segment)));
        let (mut s, rec) = Spool::open(opts(d.path())).unwrap();
        assert_eq!((rec.records, rec.points), (1, 2));
        let got = drain(&mut s);
        assert_eq!((got[0].rp.as_str(), got[0].lines.clone()), ("x", rest));
    }

    /// A disk that will not take the rest must not cost the rest: the whole
    /// record stays, and the points delivered with it are named.
    #[test]
    fn a_rest_the_disk_refuses_keeps_the_whole_record() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("spool");
        let (mut s, _) = Spool::open(opts(&dir)).unwrap();
        s.append("x", 4, &lines(4, "a"), false).unwrap();
        drop(s);
        let (mut s, _) = Spool::open(opts(&dir)).unwrap();
        let r = s.next_record().unwrap().unwrap();
        // A new segment cannot be made: the directory is gone.
        let away = d.path().join("away");
        std::fs::rename(&dir, &away).unwrap();
        let kept = s.release_rest(r.segment, r.points, "x", 1, b"m v=3i 3\n");
        assert!(
            matches!(
                kept,
                Ok(Kept::Whole {
                    delivered_too: 3,
                    ..
                })
            ),
            "{kept:?}"
        );
        assert_eq!(s.points(), 4);
        assert_eq!(s.counters.dropped_points, 0);
        drop(s);
        std::fs::rename(&away, &dir).unwrap();
        let (_, rec) = Spool::open(opts(&dir)).unwrap();
        assert_eq!((rec.records, rec.points), (1, 4));
    }

    #[test]
    fn appends_while_replaying_keep_order() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(opts(d.path())).unwrap();
        s.append("x", 1, b"a\n", false).unwrap();
        let a = s.next_record().unwrap().unwrap();
        s.append("x", 1, b"b\n", false).unwrap();
        s.ack(a.segment, a.points).unwrap();
        assert!(!s.is_empty(), "b is still unread in the same segment");
        let b = s.next_record().unwrap().unwrap();
        assert_eq!(b.lines, b"b\n");
        s.ack(b.segment, b.points).unwrap();
        assert!(s.is_empty());
        // After the active segment was deleted, appends start a new one.
        s.append("x", 1, b"c\n", false).unwrap();
        assert_eq!(s.next_record().unwrap().unwrap().lines, b"c\n");
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == EXT))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn torn_tail_is_cut_and_counted() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(opts(d.path())).unwrap();
        for i in 0..3 {
            s.append("default", 4, &lines(4, &i.to_string()), false)
                .unwrap();
        }
        drop(s);
        let seg = &segment_files(d.path())[0];
        let full = std::fs::metadata(seg).unwrap().len();
        // The process died in the middle of the third record.
        let f = OpenOptions::new().write(true).open(seg).unwrap();
        f.set_len(full - 7).unwrap();
        drop(f);
        let (mut s, rec) = Spool::open(opts(d.path())).unwrap();
        assert_eq!((rec.records, rec.points), (2, 8));
        assert_eq!(rec.damage.len(), 1);
        assert!(rec.damage[0].reason.contains("torn"), "{}", rec.damage[0]);
        assert_eq!(s.counters.damaged_records, 1);
        assert!(s.counters.damaged_bytes > 0);
        let mut damaged = seg.as_os_str().to_owned();
        damaged.push(".damaged");
        assert_eq!(
            std::fs::metadata(&damaged).unwrap().len(),
            rec.damage[0].cut_bytes
        );
        let got: Vec<_> = drain(&mut s).into_iter().map(|r| r.lines).collect();
        assert_eq!(got, vec![lines(4, "0"), lines(4, "1")]);
        // Appends after recovery go to a new, clean segment.
        s.append("default", 1, b"z\n", false).unwrap();
        drop(s);
        let (_, rec) = Spool::open(opts(d.path())).unwrap();
        assert_eq!((rec.records, rec.damage.len()), (1, 0));
    }

    /// A length running past the end of a closed (not the newest) segment
    /// is damage, not a crash's torn tail: no crash appends there, so its
    /// points were safe and no sequence gap covers them. They are counted
    /// as uncounted damage bytes; the same in the newest segment stays a
    /// torn tail.
    #[test]
    fn a_record_cut_short_in_a_closed_segment_is_damage_not_a_torn_tail() {
        let d = tempfile::tempdir().unwrap();
        let mut o = opts(d.path());
        let l = lines(2, "q");
        let rec_len = RECORD_HEADER + 5 + 7 + l.len() as u64;
        o.segment_bytes = HEADER_LEN + 2 * rec_len;
        let (mut s, _) = Spool::open(o.clone()).unwrap();
        for _ in 0..6 {
            s.append("default", 2, &l, false).unwrap();
        }
        drop(s);
        let segs = segment_files(d.path());
        assert_eq!(segs.len(), 3);
        // The first record's length of the first and of the last segment
        // made larger than the rest of its file.
        for seg in [&segs[0], &segs[2]] {
            let f = OpenOptions::new().write(true).open(seg).unwrap();
            f.write_all_at(&(1u32 << 20).to_le_bytes(), HEADER_LEN)
                .unwrap();
        }
        let (s, rec) = Spool::open(o).unwrap();
        assert_eq!(rec.damage.len(), 2, "{:?}", rec.damage);
        let (closed, newest) = (&rec.damage[0], &rec.damage[1]);
        assert_eq!(closed.segment, segs[0]);
        assert!(!closed.is_torn(), "{closed}");
        assert!(closed.to_string().contains("cannot be counted"), "{closed}");
        assert_eq!(closed.cut_bytes, 2 * rec_len);
        assert!(newest.is_torn(), "{newest}");
        assert_eq!(s.counters.uncounted_bytes, 2 * rec_len);
        assert_eq!(rec.points, 4);
    }

    #[test]
    fn a_corrupted_record_keeps_what_precedes_and_later_segments() {
        let d = tempfile::tempdir().unwrap();
        let mut o = opts(d.path());
        o.segment_bytes = 120;
        let (mut s, _) = Spool::open(o.clone()).unwrap();
        let l = lines(2, "q");
        for _ in 0..6 {
            s.append("default", 2, &l, false).unwrap();
        }
        drop(s);
        let segs = segment_files(d.path());
        assert!(segs.len() >= 3);
        let per_seg = (std::fs::metadata(&segs[0]).unwrap().len() - HEADER_LEN)
            / (RECORD_HEADER + 5 + 7 + l.len() as u64);
        assert!(per_seg >= 2, "{per_seg}");
        // Flip one byte inside the second record of the first segment.
        let rec_len = RECORD_HEADER + 5 + 7 + l.len() as u64;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&segs[0])
            .unwrap();
        let at = HEADER_LEN + rec_len + RECORD_HEADER + 20;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x55], at).unwrap();
        drop(f);
        let (mut s, rec) = Spool::open(o).unwrap();
        assert_eq!(rec.damage.len(), 1);
        assert!(
            rec.damage[0].reason.contains("checksum"),
            "{}",
            rec.damage[0]
        );
        assert_eq!(rec.damage[0].offset, HEADER_LEN + rec_len);
        let lost = per_seg - 1;
        assert_eq!(rec.records, 6 - lost);
        assert_eq!(drain(&mut s).len() as u64, 6 - lost);
    }

    /// A segment file deleted while the spool runs: its unread points are
    /// counted as dropped, and replay goes on with the next segment instead
    /// of failing on the missing file for ever. A stop counts what it
    /// still finds missing, released records included.
    #[test]
    fn a_segment_deleted_while_running_is_skipped_and_counted() {
        let d = tempfile::tempdir().unwrap();
        let mut o = opts(d.path());
        let l = lines(2, "q");
        let rec_len = RECORD_HEADER + 5 + 7 + l.len() as u64;
        // Two records a segment.
        o.segment_bytes = HEADER_LEN + 2 * rec_len;
        let (mut s, _) = Spool::open(o).unwrap();
        for _ in 0..10 {
            s.append("default", 2, &l, false).unwrap();
        }
        let segs = segment_files(d.path());
        assert_eq!(segs.len(), 5);
        let first = s.next_record().unwrap().unwrap();
        for i in [0, 2, 4] {
            std::fs::remove_file(&segs[i]).unwrap();
        }
        // The first segment's reader is open: its second record still reads.
        let second = s.next_record().unwrap().unwrap();
        s.ack(second.segment, second.points).unwrap();
        // The second segment replays; the third is gone: skipped, its 4
        // points dropped; the fourth replays.
        let mut got = Vec::new();
        for _ in 0..4 {
            let r = s.next_record().unwrap().unwrap();
            s.ack(r.segment, r.points).unwrap();
            got.push(r.segment);
        }
        let base = first.segment;
        assert_eq!(got, vec![base + 1, base + 1, base + 3, base + 3]);
        assert_eq!(s.counters.dropped_points, 4);
        // The newest (the one appends went to) is gone too: skipped, and
        // appends start a new file.
        assert_eq!(s.next_record().unwrap(), None);
        assert_eq!(s.counters.dropped_points, 8);
        assert_eq!(s.counters.damaged_records, 2);
        s.append("default", 2, &l, false).unwrap();
        assert!(seg_path(d.path(), base + 5).exists());
        // The first record, handed out before its file went, is given back
        // by a stop, which then finds the file missing: dropped too, not
        // counted as spooled for later.
        s.release(first.segment, first.points);
        assert_eq!(s.points(), 2 + 2);
        s.forget_missing().unwrap();
        assert_eq!(s.counters.dropped_points, 10);
        assert_eq!(s.points(), 2, "only the new record");
        let on_disk: u64 = segment_files(d.path())
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .sum();
        assert_eq!(s.bytes(), on_disk);
        let new = s.next_record().unwrap().unwrap();
        assert_eq!(new.segment, base + 5);
        s.ack(new.segment, new.points).unwrap();
        assert!(s.is_empty());
    }

    #[test]
    fn garbage_and_empty_segments_are_set_aside() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(seg_path(d.path(), 1), b"NBPY").unwrap();
        std::fs::write(seg_path(d.path(), 2), b"hello world, not a spool").unwrap();
        std::fs::write(seg_path(d.path(), 3), MAGIC).unwrap();
        let (mut s, rec) = Spool::open(opts(d.path())).unwrap();
        assert_eq!(rec.records, 0);
        assert_eq!(rec.damage.len(), 2);
        assert!(s.is_empty());
        s.append("x", 1, b"a\n", false).unwrap();
        // New ids never reuse an old one.
        assert!(segment_files(d.path())[0].ends_with("00000000000000000004.seg"));
    }

    #[test]
    fn block_refuses_and_drop_oldest_counts() {
        let d = tempfile::tempdir().unwrap();
        let mut o = opts(d.path());
        let l = lines(10, "x");
        let rec_len = RECORD_HEADER + 5 + 7 + l.len() as u64;
        o.segment_bytes = HEADER_LEN + 2 * rec_len;
        o.max_bytes = 3 * (HEADER_LEN + 2 * rec_len);
        let (mut s, _) = Spool::open(o.clone()).unwrap();
        for _ in 0..6 {
            assert!(matches!(
                s.append("default", 10, &l, false).unwrap(),
                Appended::Stored { .. }
            ));
        }
        assert_eq!(s.append("default", 10, &l, false).unwrap(), Appended::Full);
        assert_eq!(s.unread_points(), 60);
        // Forced (a stop) goes past the limit.
        assert!(matches!(
            s.append("default", 10, &l, true).unwrap(),
            Appended::Stored { dropped: 0 }
        ));
        drop(s);
        std::fs::remove_dir_all(d.path()).unwrap();
        o.when_full = WhenFull::DropOldest;
        let (mut s, _) = Spool::open(o.clone()).unwrap();
        for _ in 0..6 {
            s.append("default", 10, &l, false).unwrap();
        }
        assert_eq!(
            s.append("default", 10, &l, false).unwrap(),
            Appended::Stored { dropped: 20 },
            "the oldest segment goes, its two unread records counted as dropped"
        );
        assert_eq!(s.counters.dropped_points, 20);
        assert!(s.bytes() <= s.options().max_bytes);
        assert_eq!(s.segments(), 3);

        assert_eq!(
            s.append("default", 10, &l, false).unwrap(),
            Appended::Stored { dropped: 0 },
            "room for one more"
        );

        // A record in flight (retried while InfluxDB is down) keeps its
        // segment: the next oldest goes instead.
        let first = s.next_record().unwrap().unwrap();
        assert_eq!(
            s.append("default", 10, &l, false).unwrap(),
            Appended::Stored { dropped: 20 },
        );
        assert!(segment_files(d.path())
            .iter()
            .any(|f| f.ends_with(format!("{:020}.seg", first.segment))));
        // Released at a stop, it is still on disk for the next start, with
        // the rest of its segment (one unread record).
        s.release(first.segment, first.points);
        assert_eq!(s.points(), 20 + 20 + 10);
        assert_eq!(s.counters.dropped_points, 40);
        drop(s);
        let (mut s, rec) = Spool::open(o.clone()).unwrap();
        assert_eq!(rec.points, 50, "{rec:?}");
        let replayed = drain(&mut s);
        assert_eq!(replayed.len(), 5);
        assert_eq!(replayed[0].lines, first.lines, "oldest first");

        // With every segment in flight, an append goes over the limit
        // rather than drop what only memory would then hold.
        std::fs::remove_dir_all(d.path()).unwrap();
        let mut one = o;
        one.max_bytes = one.segment_bytes;
        let (mut s, _) = Spool::open(one).unwrap();
        s.append("default", 10, &l, false).unwrap();
        let held = s.next_record().unwrap().unwrap();
        assert_eq!(
            s.append("default", 10, &l, false).unwrap(),
            Appended::Stored { dropped: 0 }
        );
        s.ack(held.segment, held.points).unwrap();
        assert_eq!(drain(&mut s).len(), 1);
    }

    #[test]
    fn spool_config_parses_and_is_checked() {
        let c: crate::config::Config = toml::from_str(
            r#"
[subscribers.a]
connect = ["tcp://127.0.0.1:5558"]
[subscribers.a.spool]
fsync = "batch"
when_full = "drop-oldest"
max_bytes = 100000
segment_bytes = 60000
"#,
        )
        .unwrap();
        let s = &c.subscribers["a"];
        assert_eq!(s.spool.fsync, Fsync::Batch);
        assert_eq!(s.spool.when_full, WhenFull::DropOldest);
        assert_eq!(
            s.spool_dir(Path::new("/var/lib/nbpy"), "a"),
            Path::new("/var/lib/nbpy/spool/a")
        );
        let p = c.problems();
        assert!(
            p.iter()
                .any(|e| e.contains("subscribers.a.spool.max_bytes")),
            "{p:?}"
        );
        let bad: Result<crate::config::Config, _> =
            toml::from_str("[subscribers.a.spool]\nfsync = \"often\"\n");
        assert!(bad.unwrap_err().to_string().contains("expected \"batch\""));
    }

    #[test]
    fn fsync_policy_parses() {
        assert_eq!("batch".parse::<Fsync>(), Ok(Fsync::Batch));
        assert_eq!(
            "100ms".parse::<Fsync>(),
            Ok(Fsync::Every(Duration::from_millis(100)))
        );
        assert!("0ms".parse::<Fsync>().is_err());
        assert!("sometimes".parse::<Fsync>().is_err());
        assert_eq!(
            Fsync::Every(Duration::from_millis(250)).to_string(),
            "250ms"
        );
    }
}
