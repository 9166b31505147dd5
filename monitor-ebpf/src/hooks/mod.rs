pub mod net;
pub mod process;
