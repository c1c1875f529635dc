//! Rebuilds the tool when Nerve's Postgres migrations change: the raw Postgres baseline embeds them
//! (`sqlx::migrate!`) to make its copy of the events table, and a new migration file would otherwise
//! go unseen until something else changed.

fn main() {
    println!("cargo:rerun-if-changed=../server/migrations/postgres");
}
