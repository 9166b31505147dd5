pub mod cred;
pub mod dns;
pub mod dns_answer;
pub mod floor;
pub mod net;
pub mod payload;
pub mod process;
