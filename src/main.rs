//! The `goms` binary; everything lives in the library, see `goms::cli`.

/// glibc's malloc was about 15% of the gateway's CPU under load (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if let Err(error) = goms::cli::run() {
        eprintln!("goms: {error:#}");
        std::process::exit(1);
    }
}
