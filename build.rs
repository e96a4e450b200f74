//! Compiles `proto/` into the gRPC server and client code of `goms::service::rpc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/goms/echo/v1/echo.proto"], &["proto"])?;
    Ok(())
}
