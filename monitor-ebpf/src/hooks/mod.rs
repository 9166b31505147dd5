pub mod dns;
pub mod net;
pub mod process;
