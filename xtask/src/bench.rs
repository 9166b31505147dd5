pub fn run(_: &std::path::Path, _: u32, _: u32, _: &std::path::Path) -> anyhow::Result<()> {
    Ok(())
}
