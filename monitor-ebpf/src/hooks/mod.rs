pub mod cred;
pub mod dns;
pub mod net;
pub mod payload;
pub mod process;
