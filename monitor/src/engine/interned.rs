//! Values the engine holds many times over (executables' paths, hosts-file names and lists)
//! kept once each, shared through `Arc`s, and forgotten once nothing else holds them.

use std::{borrow::Borrow, collections::HashSet, hash::Hash, sync::Arc};

#[derive(Debug)]
pub struct Interned<T: ?Sized + Eq + Hash>(HashSet<Arc<T>>);

impl<T: ?Sized + Eq + Hash> Default for Interned<T> {
    fn default() -> Self {
        Self(HashSet::new())
    }
}

impl<T: ?Sized + Eq + Hash> Interned<T> {
    /// The shared copy of `value`, made on first sight.
    pub fn get<Q: Borrow<T>>(&mut self, value: Q) -> Arc<T>
    where
        Arc<T>: From<Q>,
    {
        if let Some(known) = self.0.get(value.borrow()) {
            return known.clone();
        }
        let shared = Arc::<T>::from(value);
        self.0.insert(shared.clone());
        shared
    }

    /// Forgets the values only this set holds.
    pub fn prune(&mut self) {
        self.0.retain(|v| Arc::strong_count(v) > 1);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
