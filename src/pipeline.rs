//! From prompt to RGB frames: loads a model directory (diffusers pipeline layout or the
//! original SkyReels-V2 layout, or the embedded default model), encodes prompts, runs the
//! streaming generator and decodes every finished block with the streaming VAE decoder.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::generate::{BlockStats, FinishedBlock, Generator, GeneratorSettings, NoiseSource};
use crate::model::config::TransformerConfig;
use crate::model::magi::stream::{MagiModel, MagiStream, MagiStreamSettings};
use crate::model::t5::{UMT5Config, UMT5Encoder, encode_prompts};
use crate::model::tokenizer::{PromptCoverage, PromptTokenizer, prompt_clean};
use crate::model::transformer::Transformer;
use crate::model::vae::{VaeStreamDecoder, WanVae, WanVaeConfig};
use crate::model::weights::{header_names, mmap_safetensors, safetensors_files};
use crate::schedule::SchedulerConfig;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded.rs"));
}

/// Which kind of model a pipeline runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// SkyReels-V2 diffusion forcing (Wan 2.1 DiT, Wan VAE, umT5).
    SkyReelsV2,
    /// MAGI-1 (chunk-wise DiT, ViT VAE, T5 v1.1).
    Magi1,
}

impl ModelFamily {
    pub fn name(&self) -> &'static str {
        match self {
            ModelFamily::SkyReelsV2 => "SkyReels-V2",
            ModelFamily::Magi1 => "MAGI-1",
        }
    }
}

/// Settings (under the element's property names) that MAGI-1 has no use for: its guidance
/// and schedule come from its config file (the base model's guidance tables, `t^2` with
/// shift 3, `chunk_width`, `window_size`), its unconditional pass uses the null caption, and
/// its MotionCache variant (`crate::cache::magi`) has no staleness bound and no minimum
/// update ratio.
pub const MAGI_UNUSED_SETTINGS: &[&str] = &[
    "negative-prompt",
    "guidance-scale",
    "shift",
    "causal-block-size",
    "ar-step",
    "window",
    "overlap",
    "refresh-interval",
    "min-update-ratio",
    "max-update-ratio",
    "temporal-consistency",
    "kv-refresh",
    "kv-refresh-window",
    "full-first-block",
];

/// What a model generates by default.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub family: ModelFamily,
    /// Settings (element property names) this model ignores.
    pub unused_settings: &'static [&'static str],
    /// Pixel frame size.
    pub width: usize,
    pub height: usize,
    /// Native frame rate.
    pub fps_num: i32,
    pub fps_den: i32,
    pub defaults: GeneratorSettings,
    /// Text context length (diffusers' max_sequence_length).
    pub text_len: usize,
}

/// Optional `motioncache.json` in a model directory: the model's defaults for generation.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
struct GenerationDefaults {
    width: Option<usize>,
    height: Option<usize>,
    fps: Option<i32>,
    steps: Option<usize>,
    guidance_scale: Option<f64>,
    shift: Option<f64>,
    causal_block_size: Option<usize>,
    ar_step: Option<usize>,
    window: Option<usize>,
    overlap: Option<usize>,
    addnoise_condition: Option<f64>,
    text_len: Option<usize>,
    /// The cache policies' rescale polynomial of the modulation distance (highest power
    /// first); Wan 2.1 1.3B's TeaCache fit when absent. `[1.0, 0.0]` = the raw distance,
    /// for models nobody fitted a polynomial to.
    cache_rescale: Option<Vec<f64>>,
}

impl GenerationDefaults {
    /// Every value in range, or an error naming the file and the key: these sizes decide
    /// allocations (a 100000-frame window would abort on memory instead of failing).
    fn check(&self, file: &str) -> Result<()> {
        fn within<T: PartialOrd + std::fmt::Display + Copy>(
            file: &str,
            key: &str,
            v: Option<T>,
            lo: T,
            hi: T,
        ) -> Result<()> {
            match v {
                Some(v) if !(v >= lo && v <= hi) => Err(Error::model(
                    file,
                    format!("{key} = {v} is outside {lo}..={hi}"),
                )),
                _ => Ok(()),
            }
        }
        within(file, "width", self.width, 8, 8192)?;
        within(file, "height", self.height, 8, 8192)?;
        within(file, "fps", self.fps, 1, 240)?;
        within(file, "steps", self.steps, 1, 1000)?;
        within(file, "guidance_scale", self.guidance_scale, 0.0, 100.0)?;
        within(file, "shift", self.shift, 1e-3, 100.0)?;
        within(file, "causal_block_size", self.causal_block_size, 1, 64)?;
        within(file, "ar_step", self.ar_step, 0, 1000)?;
        within(file, "window", self.window, 1, 1024)?;
        within(file, "overlap", self.overlap, 0, 1023)?;
        within(
            file,
            "addnoise_condition",
            self.addnoise_condition,
            0.0,
            999.0,
        )?;
        within(file, "text_len", self.text_len, 1, 4096)?;
        if let Some(r) = &self.cache_rescale
            && (r.is_empty() || r.len() > 16 || r.iter().any(|c| !c.is_finite()))
        {
            return Err(Error::model(
                file,
                format!("cache_rescale = {r:?}: 1 to 16 finite coefficients, highest power first"),
            ));
        }
        Ok(())
    }
}

/// Largest frame width or height the pipeline makes (as `motioncache.json` allows).
pub const MAX_FRAME_SIDE: usize = 8192;

/// The frame sizes a model makes: `multiple..=max` in steps of `multiple`, per side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeRange {
    pub multiple: usize,
    pub max_width: usize,
    pub max_height: usize,
}

impl SizeRange {
    pub fn contains(&self, width: usize, height: usize) -> bool {
        let side = |v: usize, max: usize| v > 0 && v <= max && v.is_multiple_of(self.multiple);
        side(width, self.max_width) && side(height, self.max_height)
    }

    /// The constraint in words, for errors.
    pub fn describe(&self) -> String {
        format!(
            "width and height must be multiples of {m}, width {m}..={}, height {m}..={}",
            self.max_width,
            self.max_height,
            m = self.multiple
        )
    }
}

/// Memory a stream needs beyond the weights, in bytes, estimated from its sizes: the
/// preallocated K/V cache (exact), the activations of a pass over the whole window, the
/// hidden states the cache keeps for its key/value refresh (`kv_refresh`; an upper bound:
/// every token of the window in progress) and the VAE decoder's feature maps (upper bounds
/// of what is live at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    pub kv_cache: u64,
    pub activations: u64,
    pub kv_refresh: u64,
    pub vae: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.kv_cache + self.activations + self.kv_refresh + self.vae
    }
}

/// Memory a new allocation on `device` can use, where it is known: the system's available
/// memory for the CPU (`MemAvailable`), the driver's free memory for a CUDA device (after
/// the model's weights, which are loaded by then); `None` for other devices.
pub fn available_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let (free, _total) = d.cuda_stream().context().mem_get_info().ok()?;
        return Some(free as u64);
    }
    if !device.is_cpu() {
        return None;
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// A model directory on disk or the embedded default model.
enum Files {
    Dir(PathBuf),
    Embedded(&'static [(&'static str, &'static [u8])]),
}

impl Files {
    fn path(&self, rel: &str) -> PathBuf {
        match self {
            Files::Dir(d) => d.join(rel),
            Files::Embedded(_) => PathBuf::from(format!("<embedded tiny model>/{rel}")),
        }
    }

    fn bytes(&self, rel: &str) -> Option<&'static [u8]> {
        match self {
            Files::Dir(_) => None,
            Files::Embedded(f) => f.iter().find(|(n, _)| *n == rel).map(|(_, b)| *b),
        }
    }

    fn exists(&self, rel: &str) -> bool {
        match self {
            Files::Dir(d) => d.join(rel).is_file(),
            Files::Embedded(_) => self.bytes(rel).is_some(),
        }
    }

    fn text(&self, rel: &str) -> Result<String> {
        match self {
            Files::Dir(d) => {
                let p = d.join(rel);
                if !p.is_file() {
                    return Err(Error::model(&p, "missing file"));
                }
                std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))
            }
            Files::Embedded(_) => {
                let b = self
                    .bytes(rel)
                    .ok_or_else(|| Error::model(self.path(rel), "missing file"))?;
                String::from_utf8(b.to_vec()).map_err(|_| Error::model(self.path(rel), "not UTF-8"))
            }
        }
    }

    fn json<T: for<'de> Deserialize<'de>>(&self, rel: &str) -> Result<T> {
        serde_json::from_str(&self.text(rel)?)
            .map_err(|e| Error::model(self.path(rel), format!("malformed: {e}")))
    }

    /// Weights of a component folder (`transformer`, `vae`, `text_encoder`) and their
    /// tensor names.
    fn weights(
        &self,
        folder: &str,
        stems: &[&str],
        dtype: DType,
        dev: &Device,
    ) -> Result<(VarBuilder<'static>, Vec<String>, PathBuf)> {
        match self {
            Files::Dir(d) => {
                let files = safetensors_files(&d.join(folder), stems)?;
                let names = header_names(&files)?;
                let vb = mmap_safetensors(&files, dtype, dev)?;
                let first = files[0].clone();
                Ok((vb, names, first))
            }
            Files::Embedded(_) => {
                for stem in stems {
                    let rel = format!("{folder}/{stem}.safetensors");
                    if let Some(b) = self.bytes(&rel) {
                        let st = safetensors::SafeTensors::deserialize(b)
                            .map_err(|e| Error::model(self.path(&rel), format!("corrupt: {e}")))?;
                        let names = st.names().into_iter().map(|s| s.to_string()).collect();
                        let vb = VarBuilder::from_slice_safetensors(b, dtype, dev)
                            .map_err(|e| Error::model(self.path(&rel), e.to_string()))?;
                        return Ok((vb, names, self.path(&rel)));
                    }
                }
                Err(Error::model(self.path(folder), "no weights"))
            }
        }
    }
}

/// The components of a SkyReels-V2 model.
struct WanModel {
    transformer: Arc<Transformer>,
    vae: WanVae,
    text_encoder: UMT5Encoder,
    tokenizer: PromptTokenizer,
    scheduler: SchedulerConfig,
}

enum Model {
    Wan(Box<WanModel>),
    Magi(Arc<MagiModel>),
}

/// One loaded model (SkyReels-V2 or MAGI-1): its components and defaults.
pub struct Pipeline {
    model: Model,
    info: ModelInfo,
    device: Device,
}

impl Pipeline {
    /// Loads a model directory; the layout (diffusers or original SkyReels-V2) is detected.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::model(dir, "not a directory"));
        }
        let files = Files::Dir(dir.to_path_buf());
        if files.exists("model_index.json") {
            Self::load_diffusers(&files, dir.display().to_string(), device, dtype)
        } else if crate::model::magi::is_magi_dir(dir) {
            Self::load_magi(dir, device, dtype)
        } else if files.exists("Wan2.1_VAE.pth") || files.exists("config.json") {
            Self::load_original(dir, device, dtype)
        } else {
            Err(Error::model(
                dir,
                "neither a diffusers pipeline (model_index.json) nor an original SkyReels-V2 \
                 directory (config.json + model.safetensors + Wan2.1_VAE.pth + \
                 models_t5_umt5-xxl-enc-bf16.pth)",
            ))
        }
    }

    /// The default tiny model compiled into the library.
    pub fn load_embedded(device: &Device, dtype: DType) -> Result<Self> {
        if embedded::FILES.is_empty() {
            return Err(Error::model(
                "models/tiny",
                "this build has no embedded model (models/tiny was missing when it was built)",
            ));
        }
        Self::load_diffusers(
            &Files::Embedded(embedded::FILES),
            "tiny (embedded)".into(),
            device,
            dtype,
        )
    }

    fn load_diffusers(files: &Files, name: String, dev: &Device, dtype: DType) -> Result<Self> {
        let index: serde_json::Value = files.json("model_index.json")?;
        if let Some(c) = index.get("_class_name").and_then(|c| c.as_str())
            && !c.contains("SkyReelsV2DiffusionForcing")
        {
            return Err(Error::model(
                files.path("model_index.json"),
                format!("pipeline {c} is not a SkyReels-V2 diffusion-forcing pipeline"),
            ));
        }
        let tcfg = TransformerConfig::from_json(&files.text("transformer/config.json")?)
            .map_err(|r| Error::model(files.path("transformer/config.json"), r))?;
        let (vb, names, wpath) = files.weights(
            "transformer",
            &["diffusion_pytorch_model", "model"],
            dtype,
            dev,
        )?;
        let transformer = crate::model::loader::transformer_from(
            &tcfg,
            &files.path("transformer/config.json"),
            vb,
            &names,
            &wpath,
        )?;

        let vcfg: WanVaeConfig = files.json("vae/config.json")?;
        vcfg.validate()
            .map_err(|e| Error::model(files.path("vae/config.json"), e.to_string()))?;
        // The VAE runs in f32 unless asked for half precision explicitly; it is small.
        let (vb, _, wpath) =
            files.weights("vae", &["diffusion_pytorch_model", "model"], dtype, dev)?;
        let vae = WanVae::new(&vcfg, vb)
            .map_err(|e| Error::model(&wpath, format!("does not match vae/config.json: {e}")))?;

        let ucfg: UMT5Config = files.json("text_encoder/config.json")?;
        let (vb, _, wpath) = files.weights(
            "text_encoder",
            &["model", "diffusion_pytorch_model"],
            dtype,
            dev,
        )?;
        let text_encoder = UMT5Encoder::new(&ucfg, vb).map_err(|e| {
            Error::model(
                &wpath,
                format!("does not match text_encoder/config.json: {e}"),
            )
        })?;
        let tokenizer = match files {
            Files::Dir(d) => PromptTokenizer::from_file(d.join("tokenizer/tokenizer.json")),
            Files::Embedded(_) => {
                let rel = "tokenizer/tokenizer.json";
                let b = files
                    .bytes(rel)
                    .ok_or_else(|| Error::model(files.path(rel), "missing file"))?;
                let cfg = files.text("tokenizer/tokenizer_config.json").ok();
                PromptTokenizer::from_bytes(b, cfg.as_deref(), files.path(rel))
            }
        }?;
        let scheduler = if files.exists("scheduler/scheduler_config.json") {
            let s: SchedulerConfig = files.json("scheduler/scheduler_config.json")?;
            s.validate()
                .map_err(|r| Error::model(files.path("scheduler/scheduler_config.json"), r))?;
            s
        } else {
            SchedulerConfig::default()
        };
        let gd: GenerationDefaults = if files.exists("motioncache.json") {
            files.json("motioncache.json")?
        } else {
            GenerationDefaults::default()
        };
        Self::assemble(
            name,
            transformer,
            vae,
            text_encoder,
            tokenizer,
            scheduler,
            gd,
            dev,
        )
    }

    fn load_original(dir: &Path, dev: &Device, dtype: DType) -> Result<Self> {
        let need = |rel: &str| -> Result<PathBuf> {
            let p = dir.join(rel);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::model(
                    &p,
                    "missing file (original SkyReels-V2 layout)",
                ))
            }
        };
        let transformer = crate::model::loader::load_transformer(dir, dtype, dev)?;
        let vae_path = need("Wan2.1_VAE.pth")?;
        // The original layout carries no VAE or encoder configuration: they are the Wan 2.1
        // VAE and umT5-XXL, unless `vae_config.json` (diffusers AutoencoderKLWan keys) or
        // `t5_config.json` (transformers UMT5 keys) beside them say otherwise.
        let files = Files::Dir(dir.to_path_buf());
        let vae_cfg = if dir.join("vae_config.json").is_file() {
            let c: WanVaeConfig = files.json("vae_config.json")?;
            c.validate()
                .map_err(|e| Error::model(files.path("vae_config.json"), e.to_string()))?;
            c
        } else {
            WanVaeConfig::default()
        };
        let vb = VarBuilder::from_pth(&vae_path, dtype, dev)
            .map_err(|e| Error::model(&vae_path, format!("cannot read: {e}")))?;
        let vae = WanVae::new_original(&vae_cfg, vb).map_err(|e| {
            Error::model(
                &vae_path,
                format!("not a Wan 2.1 VAE of this configuration: {e}"),
            )
        })?;
        let t5_path = need("models_t5_umt5-xxl-enc-bf16.pth")?;
        let t5_cfg = if dir.join("t5_config.json").is_file() {
            files.json("t5_config.json")?
        } else {
            UMT5Config::umt5_xxl()
        };
        let vb = VarBuilder::from_pth(&t5_path, dtype, dev)
            .map_err(|e| Error::model(&t5_path, format!("cannot read: {e}")))?;
        let text_encoder = UMT5Encoder::new_original(&t5_cfg, vb).map_err(|e| {
            Error::model(
                &t5_path,
                format!("not a umT5 encoder of this configuration: {e}"),
            )
        })?;
        let tok_path = need("google/umt5-xxl/tokenizer.json")?;
        let tokenizer = PromptTokenizer::from_file(&tok_path)?;
        let gd = if dir.join("motioncache.json").is_file() {
            files.json("motioncache.json")?
        } else {
            GenerationDefaults::default()
        };
        Self::assemble(
            dir.display().to_string(),
            transformer,
            vae,
            text_encoder,
            tokenizer,
            SchedulerConfig::default(),
            gd,
            dev,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        name: String,
        transformer: Transformer,
        vae: WanVae,
        text_encoder: UMT5Encoder,
        tokenizer: PromptTokenizer,
        scheduler: SchedulerConfig,
        gd: GenerationDefaults,
        dev: &Device,
    ) -> Result<Self> {
        let defaults_file = format!("{name}/motioncache.json");
        gd.check(&defaults_file)?;
        let tc = transformer.config().clone();
        let vc = vae.config().clone();
        if vc.z_dim != tc.in_channels {
            return Err(Error::model(
                &name,
                format!(
                    "the VAE has {} latent channels but the transformer takes {}",
                    vc.z_dim, tc.in_channels
                ),
            ));
        }
        if text_encoder.config().d_model != tc.text_dim {
            return Err(Error::model(
                &name,
                format!(
                    "the text encoder outputs {} channels but the transformer takes {}",
                    text_encoder.config().d_model,
                    tc.text_dim
                ),
            ));
        }
        // Defaults: the directory's motioncache.json, else SkyReels-V2-DF-1.3B-540P's
        // reference settings.
        let bs = gd
            .causal_block_size
            .unwrap_or(if tc.num_frame_per_block > 1 {
                tc.num_frame_per_block
            } else {
                5
            });
        // What the file leaves out is made consistent with what it gives and with the
        // model: a window of about 25 latent frames in whole blocks, one block of overlap
        // (none when the window is one block).
        let window = gd.window.unwrap_or_else(|| 25usize.div_ceil(bs) * bs);
        let overlap = gd.overlap.unwrap_or(if window > bs { bs } else { 0 });
        let steps = gd.steps.unwrap_or(30);
        let defaults = GeneratorSettings {
            steps,
            shift: gd.shift.unwrap_or(scheduler.flow_shift),
            guidance_scale: gd.guidance_scale.unwrap_or(6.0),
            causal_block_size: bs,
            ar_step: gd.ar_step.unwrap_or(5),
            window,
            overlap,
            addnoise_condition: gd.addnoise_condition.unwrap_or(20.0),
            fps_class: 1,
            total_frames: None,
            cache: crate::cache::CacheSettings {
                rescale: gd
                    .cache_rescale
                    .clone()
                    .unwrap_or_else(|| crate::cache::WAN_1_3B_RESCALE.to_vec()),
                ..crate::cache::CacheSettings::for_schedule(
                    crate::cache::CacheMode::MotionCache,
                    steps,
                )
            },
        };
        defaults
            .validate()
            .map_err(|e| Error::model(&defaults_file, format!("inconsistent defaults: {e}")))?;
        let fps = gd.fps.unwrap_or(24);
        let info = ModelInfo {
            name,
            family: ModelFamily::SkyReelsV2,
            unused_settings: &[],
            width: gd.width.unwrap_or(960),
            height: gd.height.unwrap_or(544),
            fps_num: fps,
            fps_den: 1,
            defaults,
            text_len: gd.text_len.unwrap_or(512),
        };
        let p = Self {
            model: Model::Wan(Box::new(WanModel {
                transformer: Arc::new(transformer),
                vae,
                text_encoder,
                tokenizer,
                scheduler,
            })),
            info,
            device: dev.clone(),
        };
        p.latent_shape(p.info.width, p.info.height)?;
        Ok(p)
    }

    /// Loads a MAGI-1 directory; its defaults come from its config (size, fps, steps).
    fn load_magi(dir: &Path, dev: &Device, dtype: DType) -> Result<Self> {
        let m = MagiModel::load(dir, dev, dtype)?;
        let cfg = m.config().clone();
        let rc = &cfg.runtime_config;
        let steps = rc.num_steps;
        let cw = rc.chunk_width;
        let defaults = GeneratorSettings {
            steps,
            shift: 3.0,
            guidance_scale: 1.0,
            causal_block_size: cw,
            ar_step: 0,
            window: cw * rc.window_size.max(1),
            overlap: 0,
            addnoise_condition: 0.0,
            fps_class: 1,
            total_frames: None,
            cache: crate::cache::CacheSettings::for_magi(
                crate::cache::CacheMode::MotionCache,
                steps,
            ),
        };
        let config_path = m.files.config_path.clone();
        defaults
            .validate()
            .map_err(|e| Error::model(&config_path, format!("unusable settings: {e}")))?;
        let fps = i32::try_from(rc.fps)
            .ok()
            .filter(|f| (1..=240).contains(f))
            .ok_or_else(|| {
                Error::model(
                    &config_path,
                    format!("runtime_config.fps {} is outside 1..=240", rc.fps),
                )
            })?;
        let info = ModelInfo {
            name: dir.display().to_string(),
            family: ModelFamily::Magi1,
            unused_settings: MAGI_UNUSED_SETTINGS,
            width: rc.video_size_w.unwrap_or(720),
            height: rc.video_size_h.unwrap_or(720),
            fps_num: fps,
            fps_den: 1,
            defaults,
            text_len: cfg.model_config.caption_max_length,
        };
        let p = Self {
            model: Model::Magi(Arc::new(m)),
            info,
            device: dev.clone(),
        };
        p.latent_shape(p.info.width, p.info.height)
            .map_err(|e| Error::model(&config_path, format!("runtime_config video size: {e}")))?;
        Ok(p)
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn wan(&self) -> Option<&WanModel> {
        match &self.model {
            Model::Wan(w) => Some(w),
            Model::Magi(_) => None,
        }
    }

    /// The SkyReels-V2 pieces, or an error naming what needed them.
    fn need_wan(&self, what: &str) -> Result<&WanModel> {
        self.wan().ok_or_else(|| {
            Error::setting(
                "model",
                &self.info.name,
                format!("{what} is for SkyReels-V2 models, this is a MAGI-1 model"),
            )
        })
    }

    /// The SkyReels-V2 transformer (`None` for MAGI-1).
    pub fn transformer(&self) -> Option<&Arc<Transformer>> {
        self.wan().map(|w| &w.transformer)
    }

    /// The SkyReels-V2 VAE (`None` for MAGI-1).
    pub fn vae(&self) -> Option<&WanVae> {
        self.wan().map(|w| &w.vae)
    }

    /// The SkyReels-V2 scheduler config (`None` for MAGI-1).
    pub fn scheduler(&self) -> Option<&SchedulerConfig> {
        self.wan().map(|w| &w.scheduler)
    }

    /// The MAGI-1 model (`None` for SkyReels-V2).
    pub fn magi(&self) -> Option<&Arc<MagiModel>> {
        match &self.model {
            Model::Magi(m) => Some(m),
            Model::Wan(_) => None,
        }
    }

    /// Pixels per latent: `(spatial, temporal)`.
    fn compression(&self) -> (usize, usize) {
        match &self.model {
            Model::Wan(w) => {
                let v = w.vae.config();
                (v.spatial_compression(), v.temporal_compression())
            }
            Model::Magi(m) => m.factors(),
        }
    }

    /// Latent frames a video of `pixel_frames` frames needs, in whole causal blocks
    /// (chunks) of `block` latent frames. SkyReels-V2's first latent frame decodes to one
    /// frame, every other to the VAE's temporal factor; all of MAGI-1's to its factor.
    pub fn latent_frames_for(&self, pixel_frames: usize, block: usize) -> usize {
        let first_alone = matches!(self.model, Model::Wan(_));
        latent_frames(pixel_frames, self.compression().1, first_alone, block)
    }

    /// The frame sizes this model can make: multiples of its spatial stride (the VAE's
    /// compression times the patch size) up to the range of its position embedding (and
    /// at most [`MAX_FRAME_SIDE`]).
    pub fn size_range(&self) -> SizeRange {
        match &self.model {
            Model::Wan(wm) => {
                let s = wm.vae.config().spatial_compression();
                let patch = wm.transformer.config().patch_size;
                let m = s * patch[1].max(patch[2]);
                let rope = wm.transformer.config().rope_max_seq_len;
                let max = |p: usize| (rope.saturating_mul(p * s)).min(MAX_FRAME_SIDE) / m * m;
                SizeRange {
                    multiple: m,
                    max_width: max(patch[2]).max(m),
                    max_height: max(patch[1]).max(m),
                }
            }
            Model::Magi(mm) => {
                // Learned RoPE frequencies over rescaled positions: no fixed range.
                let m = mm.pixel_multiple();
                SizeRange {
                    multiple: m,
                    max_width: (MAX_FRAME_SIDE / m * m).max(m),
                    max_height: (MAX_FRAME_SIDE / m * m).max(m),
                }
            }
        }
    }

    /// Latent grid `(channels, height, width)` of frames of `width x height` pixels; the
    /// size must be in [`Pipeline::size_range`].
    pub fn latent_shape(&self, width: usize, height: usize) -> Result<(usize, usize, usize)> {
        let r = self.size_range();
        if !r.contains(width, height) {
            return Err(Error::setting(
                "size",
                format!("{width}x{height}"),
                r.describe(),
            ));
        }
        let s = self.compression().0;
        let z = match &self.model {
            Model::Wan(w) => w.vae.config().z_dim,
            Model::Magi(m) => m.dit().config().latent_channels(),
        };
        Ok((z, height / s, width / s))
    }

    /// Memory that generating `width x height` frames with `settings` needs on top of the
    /// loaded weights (an estimate from the sizes; see [`MemoryEstimate`]).
    pub fn memory_estimate(
        &self,
        settings: &GeneratorSettings,
        (width, height): (usize, usize),
    ) -> Result<MemoryEstimate> {
        let (_, h, w) = self.latent_shape(width, height)?;
        let wm = match &self.model {
            Model::Wan(wm) => wm,
            Model::Magi(m) => return Ok(magi_memory(m, settings, (h, w), (width, height))),
        };
        let tc = wm.transformer.config();
        let dim = (tc.num_attention_heads * tc.attention_head_dim) as u64;
        let per_frame = ((h / tc.patch_size[1]) * (w / tc.patch_size[2])) as u64;
        let window_tokens = (settings.window.div_ceil(tc.patch_size[0])) as u64 * per_frame;
        let el = wm.transformer.dtype().size_in_bytes() as u64;
        // Two guidance branches' keys and values per layer, preallocated for the window.
        let kv_cache = 2 * 2 * tc.num_layers as u64 * window_tokens * dim * el;
        // A pass over the whole window: its hidden states, the feed-forward's inner
        // activations, the cache's per-token residuals and attention tiles, in f32.
        let activations = 2 * window_tokens * (tc.ffn_dim as u64 + 12 * dim) * 4;
        // The key/value refresh's hidden states: every layer after the first, at a token's
        // last two computations, per guidance branch.
        let kv_refresh = if settings.cache.kv_refresh
            && settings.cache.mode == crate::cache::CacheMode::MotionCache
        {
            2 * 2 * tc.num_layers.saturating_sub(1) as u64 * window_tokens * dim * el
        } else {
            0
        };
        // The VAE decodes one latent frame at a time: a few live feature maps of up to
        // `temporal_compression` frames at each resolution level.
        let v = wm.vae.config();
        let base = v.decoder_base_dim.unwrap_or(v.base_dim) as u64;
        let pixels = (width * height) as u64;
        let peak = v
            .dim_mult
            .iter()
            .enumerate()
            .map(|(i, &m)| (base * m as u64 * pixels) >> (2 * i))
            .max()
            .unwrap_or(0);
        let vae = 4 * v.temporal_compression() as u64 * peak * 4;
        Ok(MemoryEstimate {
            kv_cache,
            activations,
            kv_refresh,
            vae,
        })
    }

    /// Fails with an error that names the sizes when [`Pipeline::memory_estimate`] exceeds
    /// the memory available to this device (known for the CPU: the system's available
    /// memory); returns the estimate otherwise.
    pub fn check_memory(
        &self,
        settings: &GeneratorSettings,
        size: (usize, usize),
    ) -> Result<MemoryEstimate> {
        let e = self.memory_estimate(settings, size)?;
        if let Some(avail) = available_memory(&self.device)
            && e.total() > avail
        {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            return Err(Error::setting(
                "size",
                format!("{}x{}", size.0, size.1),
                format!(
                    "generating {}x{} frames with a window of {} latent frames needs about \
                     {:.1} GiB (K/V cache {:.1}, activations {:.1}, key/value refresh {:.1}, \
                     VAE decode {:.1}) but {:.1} GiB are available; choose a smaller size or \
                     window (or kv-refresh=off)",
                    size.0,
                    size.1,
                    settings.window,
                    gib(e.total()),
                    gib(e.kv_cache),
                    gib(e.activations),
                    gib(e.kv_refresh),
                    gib(e.vae),
                    gib(avail)
                ),
            ));
        }
        Ok(e)
    }

    /// The text context of a prompt, `[1, text_len, d_model]` (cleaned, tokenized,
    /// encoded, zeroed after the real tokens, as the reference pipeline does).
    /// SkyReels-V2 only (MAGI-1 encodes its captions per stream: [`VideoStream::set_prompt`]).
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor> {
        let w = self.need_wan("encode_prompt")?;
        Ok(encode_prompts(
            &w.text_encoder,
            &w.tokenizer,
            &[prompt],
            self.info.text_len,
        )?)
    }

    /// What the model does not read of a prompt: the words its tokenizer's vocabulary
    /// lacks (read as its unknown token) and the text past its length, which the video
    /// cannot follow.
    pub fn prompt_coverage(&self, prompt: &str) -> Result<PromptCoverage> {
        match &self.model {
            Model::Wan(w) => Ok(w
                .tokenizer
                .coverage(&prompt_clean(prompt), self.info.text_len)?),
            Model::Magi(m) => m.prompt_coverage(prompt),
        }
    }

    /// A warning for a prompt the model does not read in full, naming the property it
    /// came from (`prompt`, `negative-prompt`): the unknown words, the text cut; `None`
    /// when every word is read.
    pub fn prompt_warning(&self, property: &str, prompt: &str) -> Result<Option<String>> {
        let c = self.prompt_coverage(prompt)?;
        let mut parts = Vec::new();
        if !c.unknown.is_empty() {
            let words: Vec<String> = c.unknown.iter().map(|w| format!("{w:?}")).collect();
            parts.push(format!(
                "{} not in the vocabulary of model {} (read as its unknown token)",
                words.join(", ") + if words.len() == 1 { " is" } else { " are" },
                self.info.name
            ));
        }
        if let Some(cut) = &c.cut {
            const SHOWN: usize = 60;
            let shown: String = cut.chars().take(SHOWN).collect();
            let more = if cut.chars().count() > SHOWN {
                "..."
            } else {
                ""
            };
            parts.push(format!(
                "model {} reads its first {} tokens (text length {}), not \"{shown}{more}\"",
                self.info.name, c.read, self.info.text_len
            ));
        }
        Ok((!parts.is_empty()).then(|| format!("property '{property}': {}", parts.join("; "))))
    }

    /// A new endless (or `settings.total_frames` long) video for a prompt, at the model's
    /// native size.
    pub fn stream(
        self: &Arc<Self>,
        prompt: &str,
        negative: &str,
        settings: GeneratorSettings,
        seed: u64,
    ) -> Result<VideoStream> {
        let size = (self.info.width, self.info.height);
        self.stream_at(prompt, negative, settings, seed, size)
    }

    /// Like [`Pipeline::stream`] at a frame size `(width, height)` in
    /// [`Pipeline::size_range`].
    pub fn stream_at(
        self: &Arc<Self>,
        prompt: &str,
        negative: &str,
        settings: GeneratorSettings,
        seed: u64,
        size: (usize, usize),
    ) -> Result<VideoStream> {
        self.latent_shape(size.0, size.1)?;
        if let Model::Magi(m) = &self.model {
            let cw = m.config().runtime_config.chunk_width;
            let s = MagiStreamSettings::from_generator(&settings, cw, size);
            let stream = MagiStream::new(m.clone(), prompt, &s, seed)?;
            return Ok(VideoStream {
                pipeline: self.clone(),
                kind: StreamKind::Magi(Box::new(stream)),
            });
        }
        let cond = self.encode_prompt(prompt)?;
        let neg = self.encode_prompt(negative)?;
        self.stream_with_contexts(&cond, &neg, settings, NoiseSource::Seed(seed), size)
    }

    /// Like [`Pipeline::stream`] with pre-encoded contexts, any noise source and a frame
    /// size `(width, height)` in pixels.
    pub fn stream_with_contexts(
        self: &Arc<Self>,
        cond: &Tensor,
        negative: &Tensor,
        settings: GeneratorSettings,
        noise: NoiseSource,
        size: (usize, usize),
    ) -> Result<VideoStream> {
        let w = self.need_wan("stream_with_contexts")?;
        let generator = Generator::new(
            w.transformer.clone(),
            w.scheduler.clone(),
            settings,
            cond,
            Some(negative),
            self.latent_shape(size.0, size.1)?,
            noise,
        )?;
        Ok(VideoStream {
            pipeline: self.clone(),
            kind: StreamKind::Wan(Box::new(WanStream {
                generator,
                decoder: w.vae.stream_decoder(),
            })),
        })
    }
}

/// [`Pipeline::memory_estimate`] of a MAGI-1 stream: the KV cache of the chunks a walk
/// holds, a forward over the window (+ the re-forwarded clean chunk and the nearly-clean
/// copy), and the ViT VAE decoding one 256 x 256 tile of `fps / 2` frames.
fn magi_memory(
    m: &MagiModel,
    settings: &GeneratorSettings,
    (h, w): (usize, usize),
    (width, height): (usize, usize),
) -> MemoryEstimate {
    let c = m.dit().config();
    let rc = &m.config().runtime_config;
    let p = c.patch_size.max(1);
    let chunk_tokens = (rc.chunk_width * (h / p) * (w / p)) as u64;
    let window = rc.window_size.max(1) as u64;
    let reach = rc
        .noise2clean_kvrange
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(1) as u64;
    let held = match settings.total_frames {
        Some(f) => (f.div_ceil(rc.chunk_width.max(1)) as u64).min(reach + window),
        None => reach + window,
    };
    let el = m.dit().dtype().size_in_bytes() as u64;
    let kv = (c.num_query_groups * c.kv_channels * 2) as u64;
    let kv_cache = c.num_layers as u64 * held * chunk_tokens * kv * el;
    let d = c.hidden_size as u64;
    let fwd_tokens = (window + 2) * chunk_tokens;
    let activations = fwd_tokens * (c.ffn_hidden_size as u64 * 2 + 12 * d) * 4;
    let v = &m.vae().config;
    let (s, t) = m.factors();
    let tile = (256 / s.max(1)).pow(2) as u64 * (rc.fps / 2).div_ceil(t.max(1)).max(1) as u64;
    let frames = (rc.chunk_width * t) as u64;
    let vae = tile * v.embed_dim as u64 * 16 * 4 + 2 * 3 * frames * (width * height) as u64 * 4;
    MemoryEstimate {
        kv_cache,
        activations,
        kv_refresh: 0,
        vae,
    }
}

/// Latent frames for `pixel_frames` frames at `per_latent` frames per latent frame (the
/// first latent frame alone giving one frame when `first_alone`), in whole blocks of
/// `block`.
fn latent_frames(pixel_frames: usize, per_latent: usize, first_alone: bool, block: usize) -> usize {
    let per = per_latent.max(1);
    let latent = if first_alone {
        1 + pixel_frames.saturating_sub(1).div_ceil(per)
    } else {
        pixel_frames.div_ceil(per).max(1)
    };
    latent.div_ceil(block.max(1)) * block.max(1)
}

/// A decoded causal block.
#[derive(Debug, Clone)]
pub struct DecodedBlock {
    /// Packed RGB24 frames, `width * height * 3` bytes each.
    pub frames: Vec<Vec<u8>>,
    pub width: usize,
    pub height: usize,
    pub stats: BlockStats,
    /// The decoded frames as floats, `[3, frames, height, width]` in [-1, 1].
    pub video: Tensor,
}

/// A running video: SkyReels-V2's generator and streaming VAE decoder, or a MAGI-1 walk.
pub struct VideoStream {
    pipeline: Arc<Pipeline>,
    kind: StreamKind,
}

enum StreamKind {
    Wan(Box<WanStream>),
    Magi(Box<MagiStream>),
}

struct WanStream {
    generator: Generator,
    decoder: VaeStreamDecoder,
}

impl VideoStream {
    /// Runs until the next causal block (MAGI-1: chunk) is finished and decodes it; `None`
    /// when the requested length is reached. See [`Generator::next_block`] for `cancel`.
    pub fn next_block(&mut self, cancel: &AtomicBool) -> Result<Option<DecodedBlock>> {
        match &mut self.kind {
            StreamKind::Wan(ws) => match ws.generator.next_block(cancel)? {
                Some(block) => Ok(Some(self.decode(block)?)),
                None => Ok(None),
            },
            StreamKind::Magi(stream) => {
                let Some(chunk) = stream.next_chunk(cancel)? else {
                    return Ok(None);
                };
                let started = std::time::Instant::now();
                let mut stats = chunk.stats;
                let video = stream.model().decode(&chunk.latents)?;
                let frames = to_rgb24_truncated(&video)?;
                let (h, w) = (video.dim(2)?, video.dim(3)?);
                stats.compute += started.elapsed();
                Ok(Some(DecodedBlock {
                    frames,
                    width: w,
                    height: h,
                    stats,
                    video,
                }))
            }
        }
    }

    /// Decodes a finished SkyReels-V2 block into frames; blocks must be decoded in the
    /// order the generator produced them (the decoder is causal and keeps a cache of the
    /// last ones).
    pub fn decode(&mut self, block: FinishedBlock) -> Result<DecodedBlock> {
        let (StreamKind::Wan(ws), Some(vae)) = (&mut self.kind, self.pipeline.vae()) else {
            return Err(Error::setting(
                "model",
                &self.pipeline.info.name,
                "decoding generator blocks is for SkyReels-V2 streams",
            ));
        };
        let started = std::time::Instant::now();
        let mut stats = block.stats;
        let z = vae.denormalize_latents(&block.latents.unsqueeze(0)?)?;
        let video = ws.decoder.decode_next(&z)?; // [1, 3, T, H, W] in [-1, 1]
        let video = video.squeeze(0)?;
        let frames = to_rgb24(&video)?;
        let (h, w) = (video.dim(2)?, video.dim(3)?);
        stats.compute += started.elapsed();
        Ok(DecodedBlock {
            frames,
            width: w,
            height: h,
            stats,
            video,
        })
    }

    /// The SkyReels-V2 generator, for latents without decoding (benchmarks, tests);
    /// `None` for a MAGI-1 stream.
    pub fn generator(&mut self) -> Option<&mut Generator> {
        match &mut self.kind {
            StreamKind::Wan(ws) => Some(&mut ws.generator),
            StreamKind::Magi(_) => None,
        }
    }

    /// New SkyReels-V2 text contexts (from [`Pipeline::encode_prompt`]).
    pub fn set_contexts(&mut self, cond: &Tensor, negative: &Tensor) -> Result<()> {
        match &mut self.kind {
            StreamKind::Wan(ws) => ws.generator.set_contexts(cond, Some(negative)),
            StreamKind::Magi(_) => Err(Error::setting(
                "model",
                &self.pipeline.info.name,
                "a MAGI-1 stream takes prompts (set_prompt), not encoded contexts",
            )),
        }
    }

    /// A new prompt from the next transformer pass (MAGI-1 has no negative prompt: its
    /// unconditional pass uses the model's null caption).
    pub fn set_prompt(&mut self, prompt: &str, negative: &str) -> Result<()> {
        if let StreamKind::Magi(stream) = &mut self.kind {
            return stream.set_prompt(prompt);
        }
        let c = self.pipeline.encode_prompt(prompt)?;
        let n = self.pipeline.encode_prompt(negative)?;
        self.set_contexts(&c, &n)
    }

    /// New settings. A MAGI-1 stream keeps its schedule (`steps`) and ignores what does
    /// not apply to it ([`ModelInfo::unused_settings`]).
    pub fn set_settings(&mut self, s: GeneratorSettings) -> Result<()> {
        match &mut self.kind {
            StreamKind::Wan(ws) => ws.generator.set_settings(s),
            StreamKind::Magi(stream) if s.steps != stream.steps() => Err(Error::setting(
                "steps",
                s.steps,
                format!(
                    "a MAGI-1 stream keeps its {} steps per chunk (its chunks in flight are \
                     staggered by them); the new value applies to the next stream",
                    stream.steps()
                ),
            )),
            StreamKind::Magi(stream) => stream.set_cache(&s.cache),
        }
    }
}

/// `[3, T, H, W]` in [-1, 1] -> packed RGB24 frames, rounded to the nearest value (as
/// diffusers' video processor).
pub fn to_rgb24(video: &Tensor) -> Result<Vec<Vec<u8>>> {
    rgb24(video, true)
}

/// `[3, T, H, W]` -> packed RGB24 frames as MAGI-1's pipeline converts them
/// (`VaeHelper.decode`: `(x * 127.5 + 127.5).clamp(0, 255)` cast to uint8, truncating).
pub fn to_rgb24_truncated(video: &Tensor) -> Result<Vec<Vec<u8>>> {
    rgb24(video, false)
}

fn rgb24(video: &Tensor, round: bool) -> Result<Vec<Vec<u8>>> {
    let (c, t, _, _) = video.dims4()?;
    if c != 3 {
        return Err(Error::setting("frames", c, "expected 3 colour channels"));
    }
    let x = video.to_dtype(DType::F32)?;
    let v = if round {
        ((x.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?.round()?
    } else {
        ((x * 127.5)? + 127.5)?.clamp(0f32, 255f32)?.floor()?
    };
    let v = v.permute((1, 2, 3, 0))?.to_dtype(DType::U8)?;
    let mut frames = Vec::with_capacity(t);
    for i in 0..t {
        frames.push(v.get(i)?.flatten_all()?.to_vec1::<u8>()?);
    }
    Ok(frames)
}

/// "cpu", "cuda" or "cuda:N".
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim();
    if s.is_empty() || s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = if s == "cuda" {
        Some(0)
    } else {
        s.strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
    };
    match ordinal {
        Some(n) => {
            if !cfg!(feature = "cuda") {
                return Err(Error::setting(
                    "device",
                    s,
                    "this build has no CUDA support (rebuild with the `cuda` feature)",
                ));
            }
            // One stream for everything on this device, whichever thread uses it: candle's
            // `new_cuda` takes the calling thread's default stream, and the element loads
            // on one thread and generates on another with nothing ordering the two.
            Device::new_cuda_with_stream(n).map_err(|e| Error::setting("device", s, e.to_string()))
        }
        None => Err(Error::setting("device", s, "expected cpu, cuda or cuda:N")),
    }
}

#[cfg(test)]
mod tests {
    use super::latent_frames;

    #[test]
    fn pixel_frames_become_whole_blocks_of_latent_frames() {
        // No temporal compression (the tiny model), blocks of 3.
        assert_eq!(latent_frames(48, 1, true, 3), 48);
        assert_eq!(latent_frames(49, 1, true, 3), 51);
        assert_eq!(latent_frames(1, 1, true, 3), 3);
        // Wan: 4 frames per latent frame after the first, blocks of 5.
        assert_eq!(latent_frames(97, 4, true, 5), 25);
        assert_eq!(latent_frames(98, 4, true, 5), 30);
        // MAGI-1: 4 frames per latent frame, chunks of 6.
        assert_eq!(latent_frames(96, 4, false, 6), 24);
        assert_eq!(latent_frames(97, 4, false, 6), 30);
        assert_eq!(latent_frames(1, 4, false, 6), 6);
    }
}
