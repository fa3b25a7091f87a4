//! Real pipelines: an MP4 file read back by a demuxer, and a live RTMP push to a local nginx
//! read back with ffprobe.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use gst::prelude::*;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Frame size the element negotiates (what the model generates) and its frame rate.
fn model_format() -> (i32, i32, gst::Fraction) {
    let mut h = gst_check::Harness::with_element(&new_src(), None, Some("src"));
    h.play();
    let _ = h.pull().expect("a frame");
    let caps = h.sinkpad().unwrap().current_caps().unwrap();
    let info = gst_video::VideoInfo::from_caps(&caps).unwrap();
    (info.width() as i32, info.height() as i32, info.fps())
}

/// Demuxes an MP4 file: frame count, width, height, frame rate of its video stream.
fn read_back_mp4(path: &Path) -> (u64, i32, i32, gst::Fraction) {
    let pipeline = launch(&format!(
        "filesrc location={} ! qtdemux ! h264parse ! fakesink name=sink sync=false",
        path.display()
    ));
    let pad = pipeline
        .by_name("sink")
        .unwrap()
        .static_pad("sink")
        .unwrap();
    let count = Arc::new(Mutex::new(0u64));
    let c = count.clone();
    pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
        *c.lock().unwrap() += 1;
        gst::PadProbeReturn::Ok
    });
    let caps = Arc::new(Mutex::new(None));
    let cc = caps.clone();
    pad.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |_, info| {
        if let Some(gst::PadProbeData::Event(ev)) = &info.data
            && let gst::EventView::Caps(c) = ev.view()
        {
            *cc.lock().unwrap() = Some(c.caps_owned());
        }
        gst::PadProbeReturn::Ok
    });
    let out = run(&pipeline, 60);
    assert!(out.errors.is_empty(), "demuxing failed: {:?}", out.errors);
    assert!(out.eos);
    let caps = caps.lock().unwrap().clone().expect("caps from the demuxer");
    let s = caps.structure(0).unwrap();
    let n = *count.lock().unwrap();
    (
        n,
        s.get("width").unwrap(),
        s.get("height").unwrap(),
        s.get("framerate").unwrap(),
    )
}

#[test]
fn mp4_file_reads_back_with_the_right_frames() {
    with_timeout(400, || {
        let (w, h, fps) = model_format();
        let dir = temp_dir("mp4");
        let file = dir.join("out.mp4");
        let pipeline = launch(&format!(
            "motioncachesrc num-buffers=20 {} ! videoconvert ! x264enc ! mp4mux ! filesink \
             location={}",
            fast_launch(),
            file.display()
        ));
        let out = run(&pipeline, 300);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert!(out.eos, "recording finished");
        let (frames, fw, fh, ffps) = read_back_mp4(&file);
        assert_eq!(frames, 20);
        assert_eq!((fw, fh), (w, h));
        assert_eq!(ffps, fps);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

const RTMP_MODULE: &str = "/usr/lib/nginx/modules/ngx_rtmp_module.so";

fn find_nginx() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Kills the nginx it started when the test ends, however it ends.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_nginx(nginx: &Path, dir: &Path) -> (Nginx, u16) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "load_module {RTMP_MODULE};\n\
             daemon off;\nmaster_process off;\n\
             pid {dir}/nginx.pid;\nerror_log {dir}/error.log info;\n\
             events {{ worker_connections 64; }}\n\
             rtmp {{ server {{ listen 127.0.0.1:{port}; application live {{ live on; }} }} }}\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new(nginx)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nginx");
    let mut nginx = Nginx(child);
    let until = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = nginx.0.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = nginx.0.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("nginx exited with {status}: {err}");
        }
        assert!(Instant::now() < until, "nginx did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    (nginx, port)
}

fn ffprobe(url: &str) -> serde_json::Value {
    let out = Command::new("timeout")
        .args([
            "-k",
            "5",
            "40",
            "ffprobe",
            "-v",
            "error",
            "-rw_timeout",
            "30000000",
        ])
        .args(["-select_streams", "v:0", "-show_entries"])
        .args([
            "stream=codec_name,width,height,r_frame_rate",
            "-of",
            "json",
            url,
        ])
        .output()
        .expect("run ffprobe");
    assert!(
        out.status.success(),
        "ffprobe failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ffprobe json")
}

#[test]
fn live_rtmp_push_to_nginx_reads_back() {
    let Some(nginx) = find_nginx() else {
        eprintln!(
            "SKIPPED live_rtmp_push_to_nginx_reads_back: nginx is not installed (scripts/install-deps.sh)"
        );
        return;
    };
    if !Path::new(RTMP_MODULE).is_file() {
        eprintln!(
            "SKIPPED live_rtmp_push_to_nginx_reads_back: {RTMP_MODULE} missing (libnginx-mod-rtmp)"
        );
        return;
    }
    if Command::new("ffprobe").arg("-version").output().is_err() {
        eprintln!("SKIPPED live_rtmp_push_to_nginx_reads_back: ffprobe is not installed");
        return;
    }
    with_timeout(300, move || {
        let (w, h, _) = model_format();
        let dir = temp_dir("rtmp");
        let (_nginx, port) = start_nginx(&nginx, &dir);
        let url = format!("rtmp://127.0.0.1:{port}/live/motioncache");
        let pipeline = launch(&format!(
            "motioncachesrc is-live=true {} ! videoconvert ! x264enc tune=zerolatency \
             speed-preset=ultrafast key-int-max=6 ! h264parse ! flvmux streamable=true ! \
             rtmp2sink location={url}",
            fast_launch()
        ));
        let bus = pipeline.bus().unwrap();
        pipeline.set_state(gst::State::Playing).unwrap();
        // publishing has begun once a block went out
        let mut out = Outcome::default();
        let until = Instant::now() + Duration::from_secs(120);
        while out.stats.len() < 2 && Instant::now() < until {
            if let Some(m) = bus.timed_pop(gst::ClockTime::from_mseconds(100))
                && record(&mut out, &m)
            {
                break;
            }
        }
        assert!(out.errors.is_empty(), "publisher: {:?}", out.errors);
        let probe = ffprobe(&url);
        drain(&bus, &mut out, Duration::ZERO);
        pipeline.set_state(gst::State::Null).unwrap();
        assert!(out.errors.is_empty(), "publisher: {:?}", out.errors);
        let s = &probe["streams"][0];
        assert_eq!(s["codec_name"], "h264", "{probe}");
        assert_eq!(s["width"].as_i64(), Some(w as i64), "{probe}");
        assert_eq!(s["height"].as_i64(), Some(h as i64), "{probe}");
        let _ = std::fs::remove_dir_all(&dir);
    });
}
