fn main() {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    let loaded = isthmus_config::Loader::default().load_paths(&paths);
    for d in &loaded.diagnostics {
        println!("{d}");
    }
    println!("{} resources", loaded.resources.len());
}
