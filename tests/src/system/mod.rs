//! A private system: a copy's services on its own state folder and ports ([`Services`]), and
//! allot's processes on them ([`Allot`], [`Process`]), all stopped on drop and on every exit
//! path ([`Owned`] services, [`Process`]es SIGKILLed when dropped, [`stop_recorded`] for what a
//! crashed run left behind).

mod allot;
mod process;
mod services;

pub use allot::{Allot, AllotSpec, show_log, wait_ready};
pub use process::{Process, Recorded, Spawn, alive, recorded, stop_recorded, stop_recorded_named};
pub use services::{Owned, Service, Services};
