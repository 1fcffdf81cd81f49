//! The shapes of an aggregate's reply. An aggregate has one reply type (an enum), but most
//! commands always answer with one of its variants: `Reserve` with a reservation, `Get`
//! with a view. A caller names the shape it expects (`bus.ask_for::<SkuState, OrderView>`)
//! and gets it, typed; the one check that the reply has that shape is made in one place
//! (the bus), not at every call site.

/// A shape of the reply `R`: `from_reply` takes it out, or gives back a reply of another
/// shape (a command answered in a way its caller did not expect: a bug).
pub trait FromReply<R>: Sized {
    fn from_reply(reply: R) -> Result<Self, R>;
}

/// Declares the shapes of a reply enum: `Variant(Type)` for a tuple variant holding the
/// type, `Variant(box Type)` for one holding it boxed, `Variant` for a unit variant (the
/// shape `()`).
#[macro_export]
macro_rules! reply_shapes {
    ($reply:ident { $($variant:ident $(($($shape:tt)+))?),* $(,)? }) => {
        $( $crate::reply_shapes!(@one $reply $variant $($($shape)+)?); )*
    };
    (@one $reply:ident $variant:ident) => {
        impl $crate::reply::FromReply<$reply> for () {
            fn from_reply(reply: $reply) -> Result<(), $reply> {
                match reply {
                    $reply::$variant => Ok(()),
                    other => Err(other),
                }
            }
        }
    };
    (@one $reply:ident $variant:ident box $shape:ty) => {
        impl $crate::reply::FromReply<$reply> for $shape {
            fn from_reply(reply: $reply) -> Result<$shape, $reply> {
                match reply {
                    $reply::$variant(value) => Ok(*value),
                    #[allow(unreachable_patterns)]
                    other => Err(other),
                }
            }
        }
    };
    (@one $reply:ident $variant:ident $shape:ty) => {
        impl $crate::reply::FromReply<$reply> for $shape {
            fn from_reply(reply: $reply) -> Result<$shape, $reply> {
                match reply {
                    $reply::$variant(value) => Ok(value),
                    #[allow(unreachable_patterns)]
                    other => Err(other),
                }
            }
        }
    };
}
