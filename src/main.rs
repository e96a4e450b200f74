//! The `goms` binary; everything lives in the library, see `goms::cli`.

fn main() {
    if let Err(error) = goms::cli::run() {
        eprintln!("goms: {error:#}");
        std::process::exit(1);
    }
}
