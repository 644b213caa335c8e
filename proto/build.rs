//! Compiles the `.proto` files beside this script with protox (pure Rust: no `protoc` needed)
//! into tonic client and server code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = env!("CARGO_MANIFEST_DIR");
    let file = format!("{root}/dopd/worker/v1/worker.proto");
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file.as_str()], [root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
