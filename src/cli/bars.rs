//! Progress on an interactive stderr: byte bars for downloads and writes, spinners for
//! forward passes, one bar per batch item; nothing when stderr is not a terminal.

use ckptmap::progress::Progress;

/// A progress bar on an interactive stderr; nothing otherwise.
pub(crate) struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    pub(crate) fn new(show: bool) -> Bar {
        use std::io::IsTerminal;
        Bar((show && std::io::stderr().is_terminal()).then(indicatif::ProgressBar::hidden))
    }
}

impl Progress for Bar {
    fn begin(&self, label: &str, total: Option<u64>) {
        if let Some(b) = &self.0 {
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            if let Some(t) = total {
                b.set_length(t);
            }
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_message(label.to_string());
        }
    }
    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.0 {
            b.inc(bytes);
        }
    }
    fn end(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

/// A spinner on an interactive stderr while a long step runs (the forward passes of
/// `verify`: seconds for ViT-L); nothing with --json, -q or a redirected stderr.
pub(crate) fn spinner(show: bool, message: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    (show && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_message(message.to_string());
        b.enable_steady_tick(std::time::Duration::from_millis(120));
        b
    })
}

/// A spinner for a job stage without a byte count (the forward-pass check), drawn only on an
/// interactive stderr.
pub(crate) struct Spinner {
    pub(crate) show: bool,
    pub(crate) message: &'static str,
    pub(crate) bar: std::sync::Mutex<Option<indicatif::ProgressBar>>,
}

impl Spinner {
    pub(crate) fn new(show: bool, message: &'static str) -> Spinner {
        Spinner { show, message, bar: std::sync::Mutex::new(None) }
    }
}

impl Progress for Spinner {
    fn begin(&self, _label: &str, _total: Option<u64>) {
        *self.bar.lock().unwrap_or_else(|e| e.into_inner()) = spinner(self.show, self.message);
    }
    fn advance(&self, _bytes: u64) {}
    fn end(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish_and_clear();
        }
    }
}

/// One progress bar per running download / conversion on an interactive stderr; nothing
/// otherwise.
pub(crate) struct BatchBars(pub(crate) Option<indicatif::MultiProgress>);

impl BatchBars {
    pub(crate) fn new(show: bool) -> BatchBars {
        use std::io::IsTerminal;
        BatchBars((show && std::io::stderr().is_terminal()).then(indicatif::MultiProgress::new))
    }
}

impl ckptmap::batch::BatchEvents for BatchBars {
    fn progress(&self, item: &ckptmap::batch::ListItem, _stage: ckptmap::batch::Stage) -> Box<dyn Progress + '_> {
        Box::new(ItemBar { multi: self.0.as_ref(), name: item.output.clone(), bar: std::sync::Mutex::new(None) })
    }
    fn finished(&self, item: &ckptmap::batch::ItemReport) {
        if let Some(m) = &self.0 {
            let what = match (&item.status, &item.error) {
                (_, Some(e)) => format!("failed ({}): {}", format!("{:?}", e.stage).to_lowercase(), e.message),
                (s, None) => format!("{s:?}").to_lowercase(),
            };
            let _ = m.println(format!("{}: {what}", item.output));
        }
    }
}

/// One item's bar inside the batch's MultiProgress.
pub(crate) struct ItemBar<'a> {
    pub(crate) multi: Option<&'a indicatif::MultiProgress>,
    pub(crate) name: String,
    pub(crate) bar: std::sync::Mutex<Option<indicatif::ProgressBar>>,
}

impl Progress for ItemBar<'_> {
    fn begin(&self, label: &str, total: Option<u64>) {
        let Some(m) = self.multi else { return };
        let mut slot = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = slot.take() {
            old.finish_and_clear();
            m.remove(&old);
        }
        let bar = match total {
            Some(t) => m.add(indicatif::ProgressBar::new(t)).with_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            ),
            None => {
                let b = m.add(indicatif::ProgressBar::new_spinner());
                b.enable_steady_tick(std::time::Duration::from_millis(200));
                b
            }
        };
        bar.set_prefix(self.name.clone());
        bar.set_message(label.to_string());
        *slot = Some(bar);
    }
    fn advance(&self, bytes: u64) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            b.inc(bytes);
        }
    }
    fn end(&self) {
        if let (Some(m), Some(b)) = (self.multi, self.bar.lock().unwrap_or_else(|e| e.into_inner()).take()) {
            b.finish_and_clear();
            m.remove(&b);
        }
    }
}
