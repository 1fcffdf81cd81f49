//! Decoders of stored and received bytes never panic, hang or allocate for a length they
//! were only told about: every journal entry (snapshots, events and audit entries of every
//! hosted kind), every command and reply between nodes, the event log's recovery and
//! checkpoints, the sled stores (snapshot parts, event pointers and chunks, wake-ups, the
//! audit trail), and sealed addresses and order tokens. Each property runs on arbitrary
//! bytes and on mutations of valid encodings (`fuzz`); a corrupt input must be an error, or
//! decode to a value that encodes and decodes back to itself. Inputs that once broke a
//! decoder are kept as named tests beside the properties.
//!
//! The private decoders (log record framing in the journal, cluster messages, vault
//! records) have the same properties as unit tests in the modules that define them.
//!
//! `DROPLINE_FUZZ_CASES` runs more cases per property than the CI-sized default.

mod entries;
mod event_log;
mod fuzz;
mod secrets;
mod seeds;
mod sled_stores;
mod wakeups;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    /// The largest single allocation this thread asked for since it was last reset.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, noting each thread's largest request: a test can then tell that a
/// decoder refused a length field claiming gigabytes before allocating for it (the kernel
/// hands out untouched zeroed pages lazily, so such an allocation would not fail by itself).
struct Tracking;

fn note(size: usize) {
    // `try_with`: a thread's last allocations may come after its locals are gone.
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

// The one unsafe item of the tests: a global allocator is an unsafe trait. It only forwards
// to the system allocator.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Runs `decode` under the time guard (`fuzz::within_time`) and returns its result with
/// the largest single allocation it made.
pub fn guarded<T: Send + 'static>(decode: impl FnOnce() -> T + Send + 'static) -> (T, usize) {
    fuzz::within_time(move || {
        LARGEST.with(|largest| largest.set(0));
        let out = decode();
        (out, LARGEST.with(Cell::get))
    })
}

/// The most a decoder may allocate at once for an input of `len` bytes: serde preallocates
/// at most 1 MiB for a sequence or map whatever length it is told (a hash map's table
/// rounds that up), and anything else must be in proportion to the input.
pub fn allocation_bound(len: usize) -> usize {
    4 * 1024 * 1024 + 16 * len
}
