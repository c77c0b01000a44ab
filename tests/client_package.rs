//! The npm package in `clients/` ships its own copy of the browser client
//! served at `/client.js` (an app installs the package without the rest of
//! the repository). Checked here too, so a drift fails without Node.

#[test]
fn the_npm_package_ships_the_client_the_server_serves() {
    let shipped = [include_str!("../clients/lib/client.js"), include_str!("../clients/lib/client.d.ts")];
    let served = [include_str!("../assets/client.js"), include_str!("../assets/client.d.ts")];
    assert!(shipped == served, "clients/lib/ is stale: run `npm run build --prefix clients` and commit clients/lib/");
}
