//! Embeds the default model (`models/tiny/`, a diffusers pipeline directory) into the
//! crate, so that `Pipeline::load_embedded` works wherever the library ends up; builds the
//! CUDA attention kernel (`src/model/cuda/attention.cu`) for the CPU, where the tests run
//! it, and with the `cuda` feature as PTX for the GPU.

use std::fmt::Write;
use std::path::{Path, PathBuf};

fn collect(dir: &Path, base: &Path, out: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect(&p, base, out);
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("json") | Some("safetensors")
        ) {
            let rel = p
                .strip_prefix(base)
                .unwrap_or(&p)
                .to_string_lossy()
                .replace('\\', "/");
            out.push((rel, p));
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let tiny = root.join("models/tiny");
    println!("cargo:rerun-if-changed=models/tiny");
    let mut files = Vec::new();
    if tiny.join("model_index.json").is_file() {
        collect(&tiny, &tiny, &mut files);
    }
    for (_, p) in &files {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let mut code = String::from("pub static FILES: &[(&str, &[u8])] = &[\n");
    for (rel, p) in &files {
        let _ = writeln!(
            code,
            "    ({rel:?}, include_bytes!({:?})),",
            p.display().to_string()
        );
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it")).join("embedded.rs");
    std::fs::write(out, code).expect("write embedded.rs");
    attention_kernel();
}

/// The fused attention kernel: always compiled as C++ with the emulation of the CUDA
/// built-ins (a few seconds; `kernels::emulated_cuda_attention` runs it), and with the
/// `cuda` feature compiled by nvcc to PTX for compute capability 8.0 (the first with bf16
/// tensor-core WMMA; newer cards JIT it), embedded by `include_str!`.
fn attention_kernel() {
    println!("cargo:rerun-if-changed=src/model/cuda");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .flag_if_supported("-pthread")
        .file("src/model/cuda/attention_host.cpp")
        .compile("motioncache_attention_host");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it")).join("attention.ptx");
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-arch=compute_80", "-O3", "-std=c++17", "-o"])
        .arg(&out)
        .arg("src/model/cuda/attention.cu")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed on src/model/cuda/attention.cu ({s})"),
        Err(e) => panic!("cannot run {nvcc} for src/model/cuda/attention.cu: {e} (set NVCC)"),
    }
}
