//! The `goms` binary; everything lives in the library, see `goms::cli`.

/// mimalloc rather than glibc's malloc, whose share of the gateway's CPU under load was
/// large (docs/benchmarks-archive.md, "After the first optimisations").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if let Err(error) = goms::cli::run() {
        eprintln!("goms: {error:#}");
        std::process::exit(1);
    }
}
